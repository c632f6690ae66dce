"""Sampled completions, the behavioural check, through the shared injection engine.

Every (cell, seed) row is one sampled continuation. Rows that share a context are batched; the
delta goes in once, during the prefill, at the row's position (``injecting(once=True)``), and
decoding continues from the KV cache. Seeds are matched: every row of one prompt and seed index
samples from the same generator stream (seeded from the run seed, the prompt and the seed), so a
target and its control share their sampling noise, and batching, sharding and resuming do not
change a text. The unsteered samples of a prompt are drawn once and shared by every method.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import polars as pl
import torch

from steercmp.config_sections import CompletionSpec
from steercmp.hashing import derive_seed
from steercmp.lm.compat import cache_kwargs, output_cache
from steercmp.lm.hooks import Injection, injecting, readout_skipped
from steercmp.lm.load import LoadedModel
from steercmp.lm.prompts import pad_batch
from steercmp.lm.sampling import sample_tokens
from steercmp.schemas import COMPLETION_SCHEMA


def first_line(text: str) -> str:
    """The completed line: the continuation up to its first line break."""
    return text.split("\n", 1)[0]


def family_hits(line: str, words: Sequence[str]) -> tuple[bool, bool]:
    """(contains, ends with) a family word, matched on word boundaries, case-insensitively.

    The word forms are the logmass score's: the word, lower or capitalised, with or without a
    leading space; a case-insensitive word-boundary match covers all of them.
    """
    contains = any(re.search(rf"\b{re.escape(w)}\b", line, flags=re.IGNORECASE) for w in words)
    tokens = re.findall(r"[A-Za-z']+", line)
    last = tokens[-1].lower() if tokens else ""
    return contains, last in {w.lower() for w in words}


@attrs.frozen
class Decoding:
    """How each continuation is drawn: at most ``max_new_tokens`` tokens at ``temperature``
    (nucleus ``top_p``), stopping at EOS and, with ``stop_on_newline``, at a line break."""

    max_new_tokens: int
    temperature: float
    top_p: float = 1.0
    stop_on_newline: bool = True

    @classmethod
    def of(cls, spec: CompletionSpec) -> Decoding:
        return cls(max_new_tokens=spec.max_new_tokens, temperature=spec.temperature, top_p=spec.top_p)

    def stop_ids(self, tokenizer: Any) -> set[Any]:
        """The tokens that end a row: eos, and the newline tokens when a completion is one line."""
        return {tokenizer.eos_token_id} | (_newline_ids(tokenizer) if self.stop_on_newline else set())


@torch.no_grad()
def generate_rows(lm: LoadedModel, layer: int, context: Sequence[int], inj: Injection,
                  generators: Sequence[torch.Generator], decoding: Decoding, *, share_prefix: bool = True
                  ) -> list[list[int]]:
    """Sample one continuation per row of ``inj`` from the same context; returns new token ids.

    With ``share_prefix`` the positions before the earliest injection are prefilled once and
    their KV cache is shared by every row (the result is the same as a full prefill per row).
    """
    model, n, device = lm.model, len(inj), lm.input_device
    stop = decoding.stop_ids(lm.tokenizer)
    out: list[list[int]] = [[] for _ in range(n)]
    done = torch.zeros(n, dtype=torch.bool)
    # positions before the earliest injection are the same for every row: prefill them once
    p_min = min(int(inj.positions.min()), len(context) - 1)
    cache = None
    if share_prefix and p_min > 0:
        with readout_skipped(model):
            pre = model(input_ids=torch.as_tensor([list(context[:p_min])], device=device), use_cache=True,
                        logits_to_keep=1)
        cache = output_cache(pre)
        cache.batch_repeat_interleave(n)
    else:
        p_min = 0
    ids = torch.as_tensor([list(context[p_min:])] * n, device=device)
    with injecting(model, layer, inj, once=True, offset=p_min):
        res = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
        cache = output_cache(res)
        logits = res.logits[:, -1].cpu()  # the sampler upcasts row chunks
        active = torch.arange(n)  # rows still decoding; logits and cache rows follow this order
        for step in range(decoding.max_new_tokens):
            nxt, keep = _step(logits, active, generators, out, done, decoding, stop)
            if not bool(keep.any()) or step == decoding.max_new_tokens - 1:
                break
            if not bool(keep.all()):  # finished rows leave the batch (and the cache)
                sel = keep.nonzero().squeeze(-1)
                cache.batch_select_indices(sel.to(device))
                active, nxt = active[sel], nxt[sel]
            res = model(input_ids=nxt.view(-1, 1).to(device), **cache_kwargs(model, cache), use_cache=True)
            cache = output_cache(res)
            logits = res.logits[:, -1].cpu()  # the sampler upcasts row chunks
    return out


@torch.no_grad()
def generate_unsteered(lm: LoadedModel, contexts: Sequence[Sequence[int]], generators: Sequence[torch.Generator],
                       decoding: Decoding) -> list[list[int]]:
    """One continuation per row, each row its OWN context and nothing injected: the rows are
    left-padded into one batch (attention mask and position ids per row), so the many small
    contexts of a prompt (prompting texts, counterfactual couplets) cost one generation, not one
    each. Each row keeps its own generator, so its text does not depend on its batch (in fp32 the
    tokens equal :func:`generate_rows` per context; tests/score/test_forms.py)."""
    model, n, device = lm.model, len(contexts), lm.input_device
    stop = decoding.stop_ids(lm.tokenizer)
    ids, mask, _ = pad_batch(contexts, lm.tokenizer.pad_token_id or 0, side="left")
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    out: list[list[int]] = [[] for _ in range(n)]
    done = torch.zeros(n, dtype=torch.bool)
    res = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                use_cache=True, logits_to_keep=1)
    cache = output_cache(res)
    logits = res.logits[:, -1].cpu()  # the sampler upcasts row chunks
    nxt_pos = positions[:, -1] + 1
    active = torch.arange(n)
    for step in range(decoding.max_new_tokens):
        nxt, keep = _step(logits, active, generators, out, done, decoding, stop)
        if not bool(keep.any()) or step == decoding.max_new_tokens - 1:
            break
        if not bool(keep.all()):
            sel = keep.nonzero().squeeze(-1)
            cache.batch_select_indices(sel.to(device))
            active, nxt, mask, nxt_pos = active[sel], nxt[sel], mask[sel], nxt_pos[sel]
        mask = torch.cat([mask, torch.ones(len(active), 1, dtype=mask.dtype)], dim=1)
        res = model(input_ids=nxt.view(-1, 1).to(device), attention_mask=mask.to(device),
                    position_ids=nxt_pos.view(-1, 1).to(device), **cache_kwargs(model, cache), use_cache=True)
        cache = output_cache(res)
        logits = res.logits[:, -1].cpu()  # the sampler upcasts row chunks
        nxt_pos = nxt_pos + 1
    return out


def _step(logits: torch.Tensor, active: torch.Tensor, generators: Sequence[torch.Generator], out: list[list[int]],
          done: torch.Tensor, decoding: Decoding, stop_ids: set[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token for every active row (each with its own generator), append it, mark rows
    that hit a stop token; returns the tokens and which active rows go on."""
    nxt = sample_tokens(logits, [generators[i] for i in active.tolist()], decoding.temperature, decoding.top_p)
    for j, i in enumerate(active.tolist()):
        tok = int(nxt[j])
        out[i].append(tok)
        if tok in stop_ids:
            done[i] = True
    return nxt, ~done[active]


def _newline_ids(tokenizer: Any) -> set[int]:
    ids = set()
    for text in ("\n", "\n\n"):
        enc = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(enc) == 1:
            ids.add(enc[0])
    return ids


UNSTEERED = "unsteered"


def sample_generator(run_seed: int, prompt_id: str, seed: int) -> torch.Generator:
    """The sampling stream of one (prompt, seed): the SAME for every method, condition, alpha and
    scaling, so a target completion and its control share their sampling noise (matched seeds)."""
    g = torch.Generator()
    g.manual_seed(derive_seed(run_seed, "completion", prompt_id, seed))
    return g


def _sample_key(c: Any, seed: int) -> tuple[Any, ...]:
    """What determines a sample's text: its context, its injection (or none) and its seed."""
    r = c.row
    if r.alpha == 0.0 or float(r.delta.norm()) == 0.0:
        return (r.context, UNSTEERED, seed)
    return (r.context, c.method, c.condition, c.alpha, c.scaling, seed)


@attrs.frozen
class Sampling:
    """What sampling needs from an experiment, and nothing else: the completion settings, the
    injection layer and the run seed (every generator derives from it and the row's identity)."""

    spec: CompletionSpec
    layer: int
    seed: int


def sample_baselines(lm: LoadedModel, sampling: Sampling, prompts: Sequence[tuple[str, Sequence[int]]],
                     *, batch_rows: int = 256) -> list[list[str]]:
    """The unsteered completions of each ``(prompt id, context)``, one per seed, the prompts'
    rows left-padded into one batch: drawn once per prompt and shared by every method's unsteered
    cells (alpha 0, no-op), so all methods meet the same draws. Each row draws from its own
    (prompt, seed) stream; in bf16 a text still depends on the batch (the logits' rounding and
    the kernels' blocking), so callers keep the batches fixed (``completions.prompt_group``,
    :func:`steercmp.run.keys.sample_groups`)."""
    seeds = sampling.spec.seeds
    texts = _unsteered_texts(lm, sampling, [(context, pid, s) for pid, context in prompts for s in range(seeds)],
                             batch_rows)
    return [texts[i * seeds:(i + 1) * seeds] for i in range(len(prompts))]


def _unsteered_texts(lm: LoadedModel, sampling: Sampling, rows: Sequence[tuple[Sequence[int], str, int]],
                     batch_rows: int) -> list[str]:
    """The decoded continuation of each ``(context, prompt id, seed)`` row, nothing injected, the
    rows left-padded in batches of ``batch_rows`` in their order (each row its own stream)."""
    texts: list[str] = []
    for start in range(0, len(rows), batch_rows):
        chunk = rows[start:start + batch_rows]
        gens = [sample_generator(sampling.seed, pid, seed) for _, pid, seed in chunk]
        new = generate_unsteered(lm, [context for context, _, _ in chunk], gens, Decoding.of(sampling.spec))
        texts += [lm.tokenizer.decode(toks, skip_special_tokens=True) for toks in new]
    return texts


def sample_completions(lm: LoadedModel, sampling: Sampling, cells: Sequence[Any],
                       families: Mapping[str, Mapping[str, Sequence[str]]], *,
                       baseline: Mapping[tuple[tuple[int, ...], int], str] | None = None,
                       progress: Callable[..., Any] | None = None, log: Callable[[str], None] | None = None,
                       batch_rows: int = 256) -> pl.DataFrame:
    """Sample ``sampling.spec.seeds`` continuations for every scorable cell; a cell's context is
    its row's token ids (tokenised once, upstream), and ``families`` (prompt id -> family ->
    words) says which words are hits.

    A sample is identified by (context, injection, seed): cells that are the unsteered model on
    the same context share one text, taken from ``baseline`` (``{(context, seed): text}``, see
    :func:`sample_baselines`) when given. Every sample of a prompt and seed draws from the same
    generator stream (:func:`sample_generator`)."""
    spec = sampling.spec
    decoding = Decoding.of(spec)
    baseline = baseline or {}
    work: dict[tuple[int, ...], dict[tuple[Any, ...], tuple[Any, int]]] = {}
    wanted: list[tuple[Any, int, tuple[Any, ...]]] = []
    records: list[dict[str, Any]] = []
    texts: dict[tuple[Any, ...], str] = {}
    for c in cells:
        if c.row is None:
            records.append({"prompt_id": c.prompt_id, "method": c.method, "condition": c.condition,
                            "alpha": c.alpha, "scaling": c.scaling, "seed": None, "text": None, "line": None,
                            "hit_original": None, "hit_edited": None, "hit_unrelated": None,
                            "end_original": None, "end_edited": None, "end_unrelated": None,
                            "status": c.status})
            continue
        for seed in range(spec.seeds):
            key = _sample_key(c, seed)
            if key[1] == UNSTEERED and (key[0], seed) in baseline:
                texts[key] = baseline[(key[0], seed)]
            else:
                work.setdefault(c.row.context, {}).setdefault(key, (c, seed))
            wanted.append((c, seed, key))
    if log:
        log(f"[completions] {sum(len(v) for v in work.values())} distinct samples for {len(wanted)} rows, "
            f"{spec.seeds} seeds, alphas {list(spec.alphas)}")
    # contexts where nothing is injected (prompting texts, counterfactual couplets) share one
    # left-padded batch; contexts with injected rows keep their shared-prefix batches
    plain = [(ctx, key, item) for ctx, items in work.items() if all(k[1] == UNSTEERED for k in items)
             for key, item in items.items()]
    plain_texts = _unsteered_texts(lm, sampling, [(ctx, c.prompt_id, seed) for ctx, _, (c, seed) in plain],
                                   batch_rows)
    texts.update((key, text) for (_, key, _), text in zip(plain, plain_texts, strict=True))
    steered = {ctx: items for ctx, items in work.items() if any(k[1] != UNSTEERED for k in items)}
    batches = [(ctx, list(items.items())[s:s + batch_rows]) for ctx, items in steered.items()
               for s in range(0, len(items), batch_rows)]
    if progress is not None:
        batches = progress(batches, "sample completions", len(batches))
    for context, items in batches:
        inj = Injection.build([c.row.delta for _, (c, _) in items], [c.row.alpha for _, (c, _) in items],
                              [c.row.position for _, (c, _) in items], [c.row.scaling for _, (c, _) in items])
        gens = [sample_generator(sampling.seed, c.prompt_id, seed) for _, (c, seed) in items]
        new = generate_rows(lm, sampling.layer, context, inj, gens, decoding)
        for (key, _), toks in zip(items, new, strict=True):
            texts[key] = lm.tokenizer.decode(toks, skip_special_tokens=True)
    for c, seed, key in wanted:
        text = texts[key]
        line = first_line(text)
        fams = families[c.prompt_id]
        row = {"prompt_id": c.prompt_id, "method": c.method, "condition": c.condition,
               "alpha": c.alpha, "scaling": c.scaling, "seed": seed, "text": text, "line": line,
               "status": c.status}
        for fam in ("original", "edited", "unrelated"):
            hit, end = family_hits(line, fams[fam])
            row[f"hit_{fam}"] = hit
            row[f"end_{fam}"] = end
        records.append(row)
    df = pl.DataFrame(records, schema=COMPLETION_SCHEMA)
    return df.sort("method", "condition", "scaling", "alpha", "prompt_id", "seed", nulls_last=True)
