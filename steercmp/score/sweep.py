"""The fast scoring sweep: recompute only what an injection can change.

A delta added at the output of block L at position p cannot change
- any position before p (at any layer): their keys/values are computed once per context and
  reused from a KV cache;
- blocks 0..L at any position (the delta enters after them): their output is computed once per
  context (and per scoring branch) and reused for every row.
So each row runs blocks L+1..N-1 over positions p..end only, and logits are computed only at
the scoring slot (and the branch steps of multi-token forms).

The partial pass goes through the model's OWN forward (its masks, rotary embeddings and cache
handling) with blocks 0..L temporarily swapped for identity modules and the stored layer-L output
fed as ``inputs_embeds``; :func:`steercmp.score.full_forward.score_rows` is the plain reference it must match.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import attrs
import torch

from steercmp.errors import NumericalError
from steercmp.lm.compat import cache_kwargs, output_cache, pad_cache_layers
from steercmp.lm.hooks import (
    Injection,
    apply_injection,
    delta_survival,
    layer_outputs,
    readout_skipped,
    skipping_blocks,
)
from steercmp.lm.load import LoadedModel, decoder_layers, text_config
from steercmp.lm.prompts import pad_batch
from steercmp.lm.readout import project_to_vocab
from steercmp.score.forms import FamilyForms
from steercmp.score.full_forward import ScoreRow, group_rows

#: working memory a scoring batch may use, as a fraction of the model's own bytes: keeps the
#: staged pipeline's peak within 1.25x the largest model (issue target), on CPU and GPU alike
BATCH_MEMORY_FRACTION = 0.2
#: rows of logits read at a time (upcast, logsumexp, family masses, KLs): a few 262k-wide float32
#: rows stay in the CPU's cache across the passes (64 rows: one logsumexp 38 ms, in chunks of 4
#: 23-30 ms on the 2-core EPYC)
READ_ROWS = 4
KL_UNSTEERED = "kl_unsteered"
KL_OFFTARGET = "kl_offtarget"
SURVIVAL = "delta_survival"


def block_batch_size(lm: LoadedModel, prep: PreparedContext, n_branches: int, budget: float | None = None) -> int:
    """Rows per pass of blocks L+1..N: each row's copy of the KV cache (the whole context, once
    per branch) and its activations; the logits are projected afterwards in chunks of
    :func:`readout_batch_rows`. ``budget``: the batch budget when the caller already has it."""
    cfg = text_config(lm.model.config)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 4
    per_row = n_branches * (prep.context_len * kv_per_token + prep.h_ctx.shape[0] * lm.d_model * 4 * 24)
    budget = _batch_budget(lm) if budget is None else budget
    return max(1, min(512, int(budget // max(per_row, 1))))


def readout_batch_rows(lm: LoadedModel, budget: float | None = None) -> int:
    """Hidden-state rows projected to the vocabulary per call: as many as the batch budget holds
    (the bf16 logits and two float32 working copies per row). On CPU the projection's cost is
    mostly reading its weights once per call, so fewer, fuller calls are faster (Gemma 3 270M,
    bf16: 22 ms for 1 row, 43 ms for 64)."""
    budget = _batch_budget(lm) if budget is None else budget
    return max(1, min(512, int(budget // (_vocab(lm) * 4 * 3))))


def _vocab(lm: LoadedModel) -> int:
    return int(lm.model.get_output_embeddings().weight.shape[0])


def _batch_budget(lm: LoadedModel) -> float:
    """Working memory for one batch: the smallest of a fraction of free memory,
    :data:`BATCH_MEMORY_FRACTION` of the model's weights, and 2 GiB (beyond that a CPU batch
    gains nothing)."""
    from steercmp.lm.memory import model_bytes

    if torch.cuda.is_available() and lm.input_device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(lm.input_device)
        budget = min(free * 0.5, BATCH_MEMORY_FRACTION * model_bytes(lm.model))
    else:
        try:
            import os

            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            avail = 4 * 2**30
        budget = min(avail * 0.25, BATCH_MEMORY_FRACTION * model_bytes(lm.model), 2 * 2**30)
    return budget


@torch.no_grad()
def score_rows_fast(lm: LoadedModel, layer: int, rows: Sequence[ScoreRow], *,
                    batch_size: int | str = "auto", progress: Any = None, kl: bool = False,
                    memo: dict[Any, dict[str, Any]] | None = None) -> dict[str, torch.Tensor]:
    """Same result as :func:`steercmp.score.full_forward.score_rows`, recomputing only blocks L+1..N after p.

    Per context (rows grouped by prompt): one pass of blocks 0..L over the context and its scoring
    branches (stopped after block L), and one pass of blocks L+1..N over positions ``< p_min``
    for their KV cache. Per chunk of rows: stage A runs blocks L+1..N over positions ``p_min..score_pos``
    of the context only (one sequence per row, logits at the scoring slot only); stage B, only
    when a family has multi-token forms, extends stage A's cache with each branch's tokens (their
    layer-L output is shared by every row) and computes logits at the branch tokens only. Both
    stages stop before the vocabulary projection: a block batch's final hidden states (scoring
    slot and branch tokens together) are projected in chunks of :func:`readout_batch_rows`, since
    on CPU one projection call costs a full read of the 262k-row weights whatever its row count;
    block batches are sized by their activations and KV cache alone (:func:`block_batch_size`;
    an integer ``batch_size`` fixes the rows per block pass instead).

    With ``kl`` the result adds ``kl_unsteered``: KL(unsteered || row) of the next-token
    distribution at the scoring slot, in nats, against one unsteered pass per context (how far a
    row moves the whole distribution, not only the two families), and ``kl_offtarget``: the same
    KL over the vocabulary without the families' first tokens, renormalised, in float64 (the side
    effect: the intended shift toward or away from a family is not charged as damage).

    ``memo`` (a dict the caller keeps) holds each context's once-per-context work between calls:
    a caller that scores one prompt in several rounds (the dose search) prepares it once. The
    numbers are the same with or without it.
    """
    result = {f: torch.full((len(rows),), float("nan"),
                            dtype=torch.float64 if f in (KL_OFFTARGET, SURVIVAL) else torch.float32)
              for f in ("original", "edited", "unrelated", *((KL_UNSTEERED, KL_OFFTARGET, SURVIVAL) if kl else ()))}
    model = lm.model
    pad = lm.tokenizer.pad_token_id or 0
    groups = list(group_rows(rows).values())
    if progress is not None:
        groups = progress(groups, "score cells", len(groups))
    unsteered_of: dict[tuple[int, ...], tuple[torch.Tensor, FamilyForms]] = {}
    budget = _batch_budget(lm)  # once per call: it walks the model's parameters
    for idx in groups:
        first = rows[idx[0]]
        forms = first.forms
        p_min = min(rows[i].position for i in idx)
        known = _context_work(memo, lm, layer, first.context, forms, p_min, pad, kl)
        prep = known["prep"]
        size = batch_size if isinstance(batch_size, int) else block_batch_size(lm, prep, len(forms.branches), budget)
        per_call = max(1, readout_batch_rows(lm, budget) // (1 + prep.n_branches * prep.max_branch))  # cells
        reference = (known["base"], known["off"]) if kl else None
        if kl:
            unsteered_of[tuple(first.context)] = (known["unsteered"], forms)
        for s in range(0, len(idx), size):
            chunk = idx[s:s + size]
            inj = Injection.build([rows[i].delta for i in chunk], [rows[i].alpha for i in chunk],
                                  [rows[i].position for i in chunk], [rows[i].scaling for i in chunk])
            h0, cache = suffix_pass(model, layer, prep, inj, keep_cache=prep.n_branches > 0, project=False)
            h_branch = branch_pass(model, layer, prep, cache, len(chunk), project=False) if prep.n_branches else None
            for c in range(0, len(chunk), per_call):
                part = slice(c, c + per_call)
                masses = read_masses(model, h0[part], None if h_branch is None else h_branch[part], forms, reference)
                sel = torch.as_tensor(list(chunk[part]))
                for fam, vals in masses.items():
                    result[fam][sel] = vals
            if kl:
                result[SURVIVAL][torch.as_tensor(list(chunk))] = delta_survival(
                    prep.h_ctx.unsqueeze(0).expand(len(chunk), -1, -1), inj, offset=prep.p_min)
    if kl:
        _kl_against_other_contexts(lm, rows, result, unsteered_of)
    return result


def read_masses(model: torch.nn.Module, h0: torch.Tensor, h_branch: torch.Tensor | None, forms: FamilyForms,
                reference: tuple[tuple[torch.Tensor, float], OffTarget] | None) -> dict[str, torch.Tensor]:
    """Family log-masses (and, with the unsteered ``reference``, both KLs) of rows whose final
    hidden states are ``h0 [R, d]`` at the scoring slot and ``h_branch [R, nb, J, d]`` at the
    branch tokens: one projection to the vocabulary for all of them."""
    n = h0.shape[0]
    hidden = h0 if h_branch is None else torch.cat([h0, h_branch.reshape(-1, h_branch.shape[-1])])
    logits = project_to_vocab(model, hidden)
    step0 = logits[:n]
    branch_logits = None if h_branch is None else logits[n:].reshape(*h_branch.shape[:3], -1)
    parts = []
    for s in range(0, n, READ_ROWS):  # a few rows at a time: their float32 copies stay in cache
        rows = slice(s, s + READ_ROWS)
        step0_f = step0[rows].float()
        lse0 = torch.logsumexp(step0_f, dim=-1)
        part = masses_from_steps(step0_f, None if branch_logits is None else branch_logits[rows], forms, lse0=lse0)
        if reference is not None:
            base, off = reference
            part[KL_UNSTEERED] = kl_from(base, step0_f, lse=lse0)
            part[KL_OFFTARGET] = offtarget_kl(off, step0[rows])
        parts.append(part)
    return {k: torch.cat([part[k] for part in parts]) for k in parts[0]}


def _context_work(memo: dict[Any, dict[str, Any]] | None, lm: LoadedModel, layer: int, context: Sequence[int],
                  forms: FamilyForms, p_min: int, pad: int, kl: bool) -> dict[str, Any]:
    """One context's shared work (:class:`PreparedContext`; with ``kl`` its unsteered logits and
    distributions), from ``memo`` when an earlier call did it."""
    key = (tuple(context), p_min, id(forms))
    known = memo.get(key) if memo is not None else None
    if known is None:
        known = {"prep": prepare_context(lm, layer, context, forms, p_min, pad)}
        if memo is not None:
            memo[key] = known
    if kl and "unsteered" not in known:
        prep = known["prep"]
        zero = Injection.build(torch.zeros(1, prep.h_ctx.shape[-1]), [0.0], [prep.p_min], "raw")
        unsteered = suffix_pass(lm.model, layer, prep, zero)[0][0]
        known.update(unsteered=unsteered, base=unsteered_distribution(unsteered),
                     off=offtarget_distribution(unsteered, family_first_tokens(forms)))
    return known


def _kl_against_other_contexts(lm: LoadedModel, rows: Sequence[ScoreRow], result: dict[str, torch.Tensor],
                               unsteered_of: dict[tuple[int, ...], tuple[torch.Tensor, FamilyForms]]) -> None:
    """Rows with a ``kl_context`` (prompting rows: nothing injected, another text) get their KLs
    against that context's unsteered distribution instead of their own."""
    for i, r in enumerate(rows):
        if r.kl_context is None or tuple(r.kl_context) == tuple(r.context):
            continue
        ref = unsteered_of.get(tuple(r.kl_context))
        if ref is None:
            with torch.no_grad():
                logits = lm.model(input_ids=torch.as_tensor([list(r.kl_context)], device=lm.input_device),
                                  logits_to_keep=1).logits[0, -1]
            ref = (logits, r.forms)
            unsteered_of[tuple(r.kl_context)] = ref
        own = unsteered_of[tuple(r.context)][0] if float(r.alpha) == 0.0 or float(r.delta.norm()) == 0.0 else None
        if own is None:
            raise ValueError("a row with kl_context must inject nothing (a prompting row)")
        result[KL_UNSTEERED][i] = kl_from(unsteered_distribution(ref[0]), own.unsqueeze(0))[0]
        result[KL_OFFTARGET][i] = offtarget_kl(offtarget_distribution(ref[0], family_first_tokens(r.forms)),
                                               own.unsqueeze(0))[0]


@attrs.frozen(eq=False)
class PreparedContext:
    """What every row of one context shares: layer-L outputs and the prefix KV cache.

    ``h_ctx [S, d]``: block L's output at context positions ``p_min..score_pos``;
    ``h_branch [n_branches, max_branch, d]``: block L's output at each branch's tokens
    (right-padded); ``prefix_cache``: keys/values of positions ``< p_min`` (``None`` when 0).
    """

    p_min: int
    context_len: int
    h_ctx: torch.Tensor
    h_branch: torch.Tensor | None
    prefix_cache: Any
    max_branch: int

    @property
    def n_branches(self) -> int:
        return 0 if self.h_branch is None else int(self.h_branch.shape[0])


def prepare_context(lm: LoadedModel, layer: int, context: Sequence[int], forms: FamilyForms, p_min: int,
                    pad: int) -> PreparedContext:
    """The once-per-context work of the sweep: blocks 0..L over the context once, then over the
    branch tokens on top of the context's cache, and blocks L+1..N over the prefix for its cache."""
    from transformers import DynamicCache

    model = lm.model
    device = lm.input_device
    n_ctx = len(context)
    max_branch = forms.max_branch
    branches = [list(b) for b in forms.branches[1:]]
    cache = DynamicCache(config=text_config(model.config)) if branches else None
    h = layer_outputs(model, layer, torch.as_tensor([list(context)], device=device), cache)
    h_ctx = h[0, p_min:n_ctx]
    h_branch = None
    if branches:
        # blocks after L never ran: give them (never read) entries so masks see the true length
        pad_cache_layers(cache, range(layer + 1, len(decoder_layers(model))), n_ctx, h, model.config)
        cache.batch_repeat_interleave(len(branches))
        ids, _mask, _ = pad_batch(branches, pad, side="right")
        h_branch = layer_outputs(model, layer, ids.to(device), cache)
    prefix_cache = _upper_prefix_cache(model, layer, h[:, :p_min]) if p_min > 0 else None
    return PreparedContext(p_min=p_min, context_len=n_ctx, h_ctx=h_ctx, h_branch=h_branch,
                           prefix_cache=prefix_cache, max_branch=max_branch)


def _upper_prefix_cache(model: torch.nn.Module, layer: int, h_prefix: torch.Tensor) -> Any:
    """Keys and values of blocks L+1..N at the positions before ``p_min``, from block L's output
    there (``h_prefix [1, p_min, d]``, already computed over the whole context: by causality it is
    what a prefix-only pass gives). Every later pass skips blocks 0..L, so their entries are only
    zeros of the right length; blocks 0..L are not run a second time."""
    with skipping_blocks(model, layer), readout_skipped(model):
        out = model(inputs_embeds=h_prefix, use_cache=True, logits_to_keep=1)
    cache = output_cache(out)
    _pad_skipped_layers(cache, layer, h_prefix.shape[1], h_prefix, model.config)
    return cache


def suffix_pass(model: torch.nn.Module, layer: int, prep: PreparedContext, inj: Injection, *,
                keep_cache: bool = False, project: bool = True) -> tuple[torch.Tensor, Any]:
    """Blocks L+1..N over positions ``p_min..score_pos`` with each row's delta; logits at the
    scoring slot only. Returns ``(logits [R, V], cache or None)``; with ``project=False`` the
    final hidden states ``[R, d]`` instead, for :func:`steercmp.lm.readout.project_to_vocab`
    later. This pass alone is the minimal-recomputation bound the benchmark compares against."""
    n = len(inj)
    hidden = prep.h_ctx.unsqueeze(0).expand(n, -1, -1)
    hidden = apply_injection(hidden, inj, offset=prep.p_min)
    if hidden.data_ptr() == prep.h_ctx.data_ptr():  # nothing injected: still give the model a real batch
        hidden = hidden.contiguous()
    cache = None
    if prep.prefix_cache is not None:
        cache = copy.deepcopy(prep.prefix_cache)
        cache.batch_repeat_interleave(n)
    with skipping_blocks(model, layer), (nullcontext([]) if project else readout_skipped(model)) as store:
        out = model(inputs_embeds=hidden, **cache_kwargs(model, cache), use_cache=keep_cache or cache is not None,
                    logits_to_keep=1)
    logits = (out.logits if project else store[0])[:, -1]
    if not keep_cache:
        return logits, None
    cache = output_cache(out)
    _pad_skipped_layers(cache, layer, prep.context_len, hidden, model.config)
    return logits, cache


def _pad_skipped_layers(cache: Any, layer: int, length: int, like: torch.Tensor, config: Any) -> None:
    """Skipped blocks 0..L never wrote their cache; give them (never read) zero entries up to
    ``length`` so the model's mask and position bookkeeping (read from layer 0 and from the first
    full-attention layer) sees the true sequence length."""
    pad_cache_layers(cache, range(layer + 1), length, like, config)


def branch_pass(model: torch.nn.Module, layer: int, prep: PreparedContext, cache: Any, n_rows: int, *,
                project: bool = True) -> torch.Tensor:
    """Each row's stage-A cache extended by every branch's tokens; logits at the branch tokens.
    Returns ``[R, n_branches, max_branch, V]`` (with ``project=False`` the final hidden states,
    ``[R, n_branches, max_branch, d]``)."""
    assert prep.h_branch is not None
    nb = prep.n_branches
    cache.batch_repeat_interleave(nb)
    hidden = prep.h_branch.repeat(n_rows, 1, 1)
    with skipping_blocks(model, layer), (nullcontext([]) if project else readout_skipped(model)) as store:
        out = model(inputs_embeds=hidden, **cache_kwargs(model, cache), use_cache=True,
                    logits_to_keep=prep.max_branch)
    logits = out.logits if project else store[0]
    return logits.reshape(n_rows, nb, logits.shape[1], logits.shape[2])


def unsteered_distribution(logits: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(p, sum p log p)`` of one unsteered next-token distribution (logits ``[V]``)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    return p, float((p * logp).sum())


def _all_finite(logits: torch.Tensor) -> bool:
    """Whether every float32 logit is finite, from the rows' sums: NaN and +-inf propagate into a
    sum; a row of finite logits so large that its sum overflows is refused too, as it should be."""
    return bool(torch.isfinite(logits.sum(dim=-1)).all())


def family_first_tokens(forms: FamilyForms) -> torch.Tensor:
    """The token ids a family form starts with at the scoring slot: what off-target KL leaves out."""
    return torch.as_tensor(sorted({entry[0][2] for fam in forms.entries.values() for entry in fam if entry}),
                           dtype=torch.long)


#: above this centred log-ratio a row's float32 expm1 could overflow: such a row (a KL of tens of
#: nats) is summed as a logsumexp instead
_EXPM1_LIMIT = 80.0


@attrs.frozen(eq=False)
class OffTarget:
    """The unsteered distribution without the family tokens, renormalised: ``p [V]`` (float32,
    zero on the family tokens), the unsteered ``logits [V]`` (float32) and the ``exclude``d token
    ids."""

    p: torch.Tensor
    logits: torch.Tensor
    exclude: torch.Tensor


def offtarget_distribution(logits: torch.Tensor, exclude: torch.Tensor) -> OffTarget:
    """:class:`OffTarget` of one unsteered next-token distribution (logits ``[V]``)."""
    keep = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
    keep[exclude.to(logits.device)] = False
    x = logits.float()
    p = torch.softmax(x.masked_fill(~keep, float("-inf")), dim=-1)
    return OffTarget(p=p, logits=x, exclude=exclude.to(logits.device))


def offtarget_kl(off: OffTarget, logits: torch.Tensor) -> torch.Tensor:
    """Off-target KL(unsteered || row) in nats for each row of ``logits [R, V]``, returned in
    float64, computed in float32 without cancellation. With ``d`` the row's logits minus the
    unsteered ones and ``m`` its mean under ``p'`` (the kept tokens' unsteered distribution),
    ``KL = log(sum p' exp(d - m)) - sum p' (d - m) = log1p(sum p' expm1(d - m)) - sum p' (d - m)``:
    every term is small where the KL is small, so a KL of 1e-9 keeps about four digits (the
    textbook ``sum p log p - p . x + logsumexp(x)`` cancels to 0 in float32 near 1e-5, and in
    float64 it costs five times as much)."""
    out = torch.empty(logits.shape[0], dtype=torch.float64)
    p, ref, exclude = off.p.to(logits.device), off.logits.to(logits.device), off.exclude.to(logits.device)
    for s in range(0, logits.shape[0], READ_ROWS):
        d = torch.sub(logits[s:s + READ_ROWS], ref)  # float32 (bf16 logits: exact differences)
        d.index_fill_(1, exclude, 0.0)  # p' is 0 there: nothing to add, and no overflow
        d.sub_((d @ p).unsqueeze(-1))
        centred = d @ p  # ~0, but the exact residual of the centring: it cancels m's rounding
        high = d.amax(dim=-1) > _EXPM1_LIMIT
        lse = torch.logsumexp(d[high] + p.log(), dim=-1) if bool(high.any()) else None  # log p' = -inf off-target
        kl = torch.log1p(d.expm1_() @ p) - centred
        if lse is not None:
            kl[high] = lse - centred[high]
        out[s:s + READ_ROWS] = kl.clamp_min(0.0).double().cpu()
    return out


def kl_from(base: tuple[torch.Tensor, float], logits: torch.Tensor, *, lse: torch.Tensor | None = None
            ) -> torch.Tensor:
    """KL(base || row) in nats for each row of ``logits [R, V]``:
    ``sum p log p - p . logits + logsumexp(logits)``, one matrix-vector product and one
    logsumexp per row (no row-sized log-softmax); ``lse``: the rows' float32 logsumexp when the
    caller already has it."""
    p, neg_entropy = base
    x = logits.float()
    if lse is None:
        lse = torch.logsumexp(x, dim=-1)
    return (neg_entropy - x @ p.to(x.device) + lse).clamp_min(0.0).cpu()


def masses_from_steps(step0: torch.Tensor, branch_logits: torch.Tensor | None, forms: FamilyForms, *,
                      lse0: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Family log-masses from the scoring-slot logits ``[R, V]`` and the branch-token logits
    ``[R, nb-1, J-1, V]``; the same formula as :func:`steercmp.score.forms.family_logmass`.
    ``lse0``: the scoring-slot rows' float32 logsumexp when the caller already has it."""
    step0 = step0.float()
    if branch_logits is not None:
        branch_logits = branch_logits.float()
    # checked on the float32 rows' sums: a fifteenth of the cost of an element-wise isfinite over
    # 262k-wide bf16 rows
    if not _all_finite(step0) or (branch_logits is not None and not _all_finite(branch_logits)):
        raise NumericalError("logits contain NaN or inf", fix="lower alpha or use float32")
    if lse0 is None:
        lse0 = torch.logsumexp(step0, dim=-1)
    lse_b = None
    if branch_logits is not None:
        lse_b = torch.logsumexp(branch_logits, dim=-1)  # [R, nb-1, J-1]
    out: dict[str, torch.Tensor] = {}
    for fam, fam_entries in forms.entries.items():
        per_form = []
        for entry in fam_entries:
            lp = torch.zeros_like(lse0)
            for b, j, tok in entry:
                if j == 0:
                    lp = lp + (step0[:, tok] - lse0)
                else:
                    assert branch_logits is not None and lse_b is not None
                    lp = lp + (branch_logits[:, b - 1, j - 1, tok] - lse_b[:, b - 1, j - 1])
            per_form.append(lp)
        out[fam] = torch.logsumexp(torch.stack(per_form, dim=-1), dim=-1).cpu()
    return out
