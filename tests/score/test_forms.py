"""Family log-mass scoring and the fast sweep against a plain forward with log_softmax."""

import pytest
import torch

from steercmp.lm.hooks import Injection, injecting
from steercmp.lm.load import LoadedModel
from steercmp.score.forms import family_forms
from steercmp.score.full_forward import ScoreRow, score_rows
from steercmp.score.sweep import score_rows_fast
from steercmp.testing import tiny_model

LAYER = 1


class FakeTokenizer:
    """Maps surface forms to fixed token sequences (multi-token words included)."""

    pad_token_id = 0

    def __init__(self, table):
        self.table = table

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(self.table.get(text, ()))}


TABLE = {
    " dream": (40,), " Dream": (41,), "dream": (42,), "Dream": (42,),  # duplicate forms dedupe
    " gleam": (50, 51), " Gleam": (50, 52), "gleam": (53, 54, 55), "Gleam": (56,),
    " stone": (60,), " Stone": (61, 62), "stone": (63,), "Stone": (64,),
}
FAMILIES = {"original": ("dream",), "edited": ("gleam",), "unrelated": ("stone",)}


@torch.no_grad()
def chained_logprob(model, context, form, inj=None):
    """Independent reference: one plain forward per form, log_softmax, sum over the chain."""
    ids = torch.tensor([list(context) + list(form[:-1])])
    if inj is None:
        logits = model(input_ids=ids).logits
    else:
        with injecting(model, LAYER, inj):
            logits = model(input_ids=ids).logits
    lp = torch.log_softmax(logits.float(), -1)[0]
    start = len(context) - 1
    return sum(float(lp[start + j, t]) for j, t in enumerate(form))


def reference_mass(model, context, family, inj=None):
    forms = {TABLE[f] for w in FAMILIES[family] for f in (" " + w, " " + w.title(), w, w.title())}
    return float(torch.logsumexp(torch.tensor([chained_logprob(model, context, f, inj) for f in forms]), 0))


def test_plan_forms_dedupes_and_branches():
    plan = family_forms(FakeTokenizer(TABLE), FAMILIES)
    assert len(plan.forms["original"]) == 3  # "dream" and "Dream" share a token
    assert plan.branches[0] == ()
    # (50,) is a prefix of (53, 54)? no; maximal branches only: (50,), (53, 54), (61,)
    assert set(plan.branches[1:]) == {(50,), (53, 54), (61,)}
    assert plan.max_branch == 2


def make_rows(plan, context, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        rows.append(ScoreRow(tuple(context), len(context) - 1, plan, torch.randn(64, generator=g),
                             [0.0, 1.0, -2.0, 3.0][i % 4], [3, 4, 2, 5][i % 4],
                             ["raw", "norm_relative"][i % 2]))
    return rows


def test_reference_scorer_matches_plain_forward():
    model = tiny_model()
    lm = LoadedModel(model, FakeTokenizer(TABLE), "tiny", "", torch.float32, "cpu")
    plan = family_forms(lm.tokenizer, FAMILIES)
    context = [2, 10, 11, 12, 13, 14, 15, 16]
    rows = make_rows(plan, context)
    got = score_rows(lm, LAYER, rows, batch_size=4)
    for i, r in enumerate(rows):
        inj = Injection.build(r.delta[None], [r.alpha], [r.position], r.scaling)
        for fam in FAMILIES:
            assert got[fam][i] == pytest.approx(reference_mass(model, context, fam, inj), abs=1e-4)


def test_fast_sweep_equals_reference():
    model = tiny_model(seed=3)
    lm = LoadedModel(model, FakeTokenizer(TABLE), "tiny", "", torch.float32, "cpu")
    plan = family_forms(lm.tokenizer, FAMILIES)
    rows = make_rows(plan, [2, 10, 11, 12, 13, 14, 15, 16], n=8)
    rows += make_rows(plan, [2, 20, 21, 22, 23, 24, 25], n=5, seed=1)  # a second context
    ref = score_rows(lm, LAYER, rows, batch_size=3)
    for bs in (1, 4, "auto"):
        fast = score_rows_fast(lm, LAYER, rows, batch_size=bs)
        for fam in FAMILIES:
            torch.testing.assert_close(fast[fam], ref[fam], atol=1e-4, rtol=1e-4)


def test_fast_sweep_with_injection_at_bos_and_last_layer():
    model = tiny_model(seed=4)
    lm = LoadedModel(model, FakeTokenizer(TABLE), "tiny", "", torch.float32, "cpu")
    plan = family_forms(lm.tokenizer, FAMILIES)
    context = [2, 10, 11, 12, 13]
    rows = [ScoreRow(tuple(context), 4, plan, torch.randn(64), 2.0, p, "raw") for p in (0, 2, 4)]
    for layer in (0, 3):
        ref = score_rows(lm, layer, rows)
        fast = score_rows_fast(lm, layer, rows)
        for fam in FAMILIES:
            torch.testing.assert_close(fast[fam], ref[fam], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_fast_sweep_on_embedded_model(embedded_lm):
    from steercmp.api import Prompt
    from steercmp.lm.capture import extract

    prompt = Prompt(id="p", text="Upon the bank I sat beside the stream,\nAnd closed my eyes and drifted in a",
                    families={"original": ("dream",), "edited": ("gleam", "beam"), "unrelated": ("stone",)})
    ctx = extract(embedded_lm, 12, [prompt])[0]
    # hidden_states[13] is the output of block 12
    out = embedded_lm.model(input_ids=torch.tensor([ctx.input_ids]), output_hidden_states=True)
    torch.testing.assert_close(ctx.resid, out.hidden_states[13][0].float(), atol=1e-4, rtol=1e-4)
    plan = family_forms(embedded_lm.tokenizer, prompt.families)
    g = torch.Generator().manual_seed(0)
    rows = [ScoreRow(ctx.input_ids, ctx.score_pos, plan, torch.randn(640, generator=g) * 300, a,
                     ctx.inject_pos + off, s)
            for a in (0.0, 2.0) for off in (0, -1) for s in ("raw", "norm_relative")]
    ref = score_rows(embedded_lm, 12, rows)
    fast = score_rows_fast(embedded_lm, 12, rows)
    for fam in ("original", "edited", "unrelated"):
        torch.testing.assert_close(fast[fam], ref[fam], atol=1e-4, rtol=1e-4)
    # unsteered masses equal a plain forward's log_softmax for the single-token form ' dream'
    lp = torch.log_softmax(out.logits[0, ctx.score_pos].float(), -1)
    dream = embedded_lm.tokenizer(" dream", add_special_tokens=False)["input_ids"]
    assert len(dream) == 1
    assert float(ref["original"][0]) >= float(lp[dream[0]]) - 1e-5


def test_batched_sampler_draws_from_the_softmax():
    """sample_tokens is exact inverse-CDF sampling: on a known distribution over a vocabulary that
    spans several blocks, the empirical frequencies match the softmax (chi-square), zero-probability
    tokens are never drawn, and each row depends only on its own generator."""
    import numpy as np
    import torch
    from scipy.stats import chisquare

    from steercmp.lm.sampling import SAMPLE_BLOCK, sample_tokens

    vocab = 3 * SAMPLE_BLOCK + 7
    logits = torch.full((vocab,), -float("inf"))
    support = torch.tensor([3, 700, 1100, vocab - 1])
    logits[support] = torch.tensor([0.0, 1.0, -0.5, 0.5])
    probs = torch.softmax(logits, -1)[support].numpy()
    n = 4000
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    drawn = sample_tokens(logits.expand(n, vocab), gens, temperature=1.0)
    assert set(drawn.tolist()) <= set(support.tolist())
    counts = np.array([(drawn == t).sum().item() for t in support])
    assert chisquare(counts, probs * n).pvalue > 1e-3
    # a row's token depends on its generator only, not on the batch around it
    alone = sample_tokens(logits[None], [torch.Generator().manual_seed(17)], temperature=1.0)
    assert int(alone[0]) == int(drawn[17])
    # top-p keeps the most likely tokens reaching the mass
    top = sample_tokens(logits.expand(200, vocab), [torch.Generator().manual_seed(i) for i in range(200)],
                        temperature=1.0, top_p=0.4)
    assert set(top.tolist()) == {700}
    assert torch.equal(sample_tokens(logits[None], [torch.Generator()], temperature=0.0), torch.tensor([700]))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_chunks_rows_and_reads_model_dtype_logits_without_changing_a_token(monkeypatch, temperature):
    """Rows are drawn in chunks sized from the vocabulary's bytes, and bf16 logits are upcast a
    chunk at a time: every token equals the one drawn from the whole float32 batch at once."""
    from steercmp.lm import sampling

    vocab, n = 4 * sampling.SAMPLE_BLOCK + 11, 37
    logits = (torch.randn(n, vocab, generator=torch.Generator().manual_seed(3)) * 4).to(torch.bfloat16)

    def draw(x):
        return sampling.sample_tokens(x, [torch.Generator().manual_seed(100 + i) for i in range(n)], temperature)

    whole = draw(logits.float())  # the default chunk holds every row of this small vocabulary
    monkeypatch.setattr(sampling, "SAMPLE_CHUNK_BYTES", 5 * 2 * 4 * vocab)  # chunks of 5 rows (the last one 2)
    assert torch.equal(draw(logits), whole) and torch.equal(draw(logits.float()), whole)
    assert len(set(whole.tolist())) > 10


def test_kl_unsteered_equals_plain_forward():
    """kl_unsteered is KL(unsteered || row) of the next-token distribution at the scoring slot,
    against a plain forward with and without the injection hook; zero for an unsteered row."""
    model = tiny_model(seed=5)
    lm = LoadedModel(model, FakeTokenizer(TABLE), "tiny", "", torch.float32, "cpu")
    plan = family_forms(lm.tokenizer, FAMILIES)
    rows = make_rows(plan, [2, 10, 11, 12, 13, 14, 15, 16], n=6)
    rows.append(ScoreRow(rows[0].input_ids, rows[0].score_pos, plan, torch.zeros(64), 0.0, 2, "raw"))
    fast = score_rows_fast(lm, LAYER, rows, batch_size=4, kl=True)
    ids = torch.tensor([list(rows[0].input_ids)])
    with torch.no_grad():
        base = torch.log_softmax(model(input_ids=ids).logits[0, rows[0].score_pos].float(), -1)
        for i, r in enumerate(rows):
            with injecting(model, LAYER, Injection.build(r.delta[None], [r.alpha], [r.position], r.scaling)):
                lp = torch.log_softmax(model(input_ids=ids).logits[0, r.score_pos].float(), -1)
            want = float((base.exp() * (base - lp)).sum())
            assert float(fast["kl_unsteered"][i]) == pytest.approx(want, abs=1e-5)
    assert float(fast["kl_unsteered"][-1]) < 1e-6 and float(fast["kl_unsteered"][:-1].max()) > 1e-3
    assert "kl_unsteered" not in score_rows_fast(lm, LAYER, rows[:2])  # only on request


def test_kl_offtarget_equals_a_float64_reference_without_the_family_tokens():
    """kl_offtarget: KL over the vocabulary without the families' first tokens, both distributions
    renormalised, in float64, against a plain forward; a prompting row (kl_context) is measured
    against the ORIGINAL context's unsteered distribution, not its own."""
    model = tiny_model(seed=5)
    lm = LoadedModel(model, FakeTokenizer(TABLE), "tiny", "", torch.float32, "cpu")
    plan = family_forms(lm.tokenizer, FAMILIES)
    rows = make_rows(plan, [2, 10, 11, 12, 13, 14, 15, 16], n=6)
    other = (2, 10, 11, 19, 13, 14, 15, 16)  # a "prompting" text: nothing injected
    rows.append(ScoreRow(other, 7, plan, torch.zeros(64), 0.0, 7, "raw", kl_context=rows[0].input_ids))
    fast = score_rows_fast(lm, LAYER, rows, batch_size=4, kl=True)
    first = sorted({e[0][2] for fam in plan.entries.values() for e in fam})
    keep = torch.ones(model.config.vocab_size, dtype=torch.bool)
    keep[first] = False

    def off(logits):
        return torch.log_softmax(logits.double()[keep], -1)

    ids = torch.tensor([list(rows[0].input_ids)])
    with torch.no_grad():
        base = off(model(input_ids=ids).logits[0, 7])
        for i, r in enumerate(rows[:-1]):
            with injecting(model, LAYER, Injection.build(r.delta[None], [r.alpha], [r.position], r.scaling)):
                lp = off(model(input_ids=ids).logits[0, 7])
            want = float((base.exp() * (base - lp)).sum())
            assert float(fast["kl_offtarget"][i]) == pytest.approx(want, rel=1e-4, abs=1e-9)
        lp = off(model(input_ids=torch.tensor([list(other)])).logits[0, 7])
        want = float((base.exp() * (base - lp)).sum())
    assert want > 1e-4 and float(fast["kl_offtarget"][-1]) == pytest.approx(want, rel=1e-4)
    assert fast["kl_offtarget"].dtype == torch.float64


@pytest.mark.parametrize("where", ["step0", "branch"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_are_refused_wherever_they_are(where, bad):
    """The scorer's finiteness check (from the rows' float32 sums) refuses one bad logit anywhere:
    at the scoring slot or at a branch token, NaN or either infinity, in bf16 as in fp32."""
    from steercmp.errors import NumericalError
    from steercmp.score.sweep import masses_from_steps

    plan = family_forms(FakeTokenizer(TABLE), FAMILIES)
    assert plan.branches[1:], "the test needs a multi-token form"
    nb, mb = len(plan.branches) - 1, plan.max_branch
    for dtype in (torch.bfloat16, torch.float32):
        step0 = torch.randn(3, 400).to(dtype)
        branch = torch.randn(3, nb, mb, 400).to(dtype)
        assert all(torch.isfinite(v).all() for v in masses_from_steps(step0, branch, plan).values())
        (step0 if where == "step0" else branch).view(-1)[777] = bad
        with pytest.raises(NumericalError):
            masses_from_steps(step0, branch, plan)
