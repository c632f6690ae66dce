"""Completions: steercmp's batched sampling against one ``generate`` per sample."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import attrs
import torch

from steercmp.bench.grid import subsample
from steercmp.hashing import derive_seed
from steercmp.lm.hooks import Injection, injecting
from steercmp.lm.load import LoadedModel
from steercmp.score.full_forward import ScoreRow
from steercmp.score.sample import Decoding, _newline_ids, generate_rows


@attrs.frozen
class CompletionBench:
    """The completions benchmark's size: prompts, seeds per cell, tokens per sample, samples the
    per-sample loop times, and the seed of the generators."""

    n_prompts: int
    seeds: int
    max_new_tokens: int
    loop_samples: int
    seed: int = 0


QUICK_COMPLETIONS = CompletionBench(n_prompts=8, seeds=5, max_new_tokens=8, loop_samples=12)
SMOKE_COMPLETIONS = CompletionBench(n_prompts=1, seeds=2, max_new_tokens=4, loop_samples=4)
FULL_COMPLETIONS = CompletionBench(n_prompts=8, seeds=5, max_new_tokens=8, loop_samples=24)


@torch.no_grad()
def completion_bench(lm: LoadedModel, layer: int, rows: Sequence[ScoreRow], cells: Sequence[dict[str, Any]],
                     size: CompletionBench) -> dict[str, Any]:
    """Batched sampling (one :func:`generate_rows` call per prompt) vs one ``generate`` per sample."""
    n_prompts, seeds, max_new_tokens = size.n_prompts, size.seeds, size.max_new_tokens
    loop_samples, seed = size.loop_samples, size.seed
    prompt_ids = list(dict.fromkeys(c["prompt_id"] for c in cells))[:n_prompts]
    chosen = [i for i, c in enumerate(cells) if c["prompt_id"] in prompt_ids
              and c["condition"] in ("target_edit", "noop") and c["alpha"] in (0.0, 2.0)]
    samples = [(i, s) for i in chosen for s in range(seeds)]

    def gen_for(i: int, s: int) -> torch.Generator:
        c = cells[i]
        return torch.Generator().manual_seed(derive_seed(seed, "bench-completion", c["prompt_id"],
                                                         c["condition"], c["alpha"], s))

    by_ctx: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for i, s in samples:
        by_ctx.setdefault(rows[i].context, []).append((i, s))
    t = time.perf_counter()
    n_tokens = 0
    for context, items in by_ctx.items():
        inj = Injection.build([rows[i].delta for i, _ in items], [rows[i].alpha for i, _ in items],
                              [rows[i].position for i, _ in items], [rows[i].scaling for i, _ in items])
        new = generate_rows(lm, layer, context, inj, [gen_for(i, s) for i, s in items],
                            Decoding(max_new_tokens, 1.0))
        n_tokens += sum(len(x) for x in new)
    batched_s = time.perf_counter() - t

    loop_idx = subsample(len(samples), loop_samples, 1)
    stop = sorted({lm.tokenizer.eos_token_id, *_newline_ids(lm.tokenizer)} - {None})
    pad = lm.tokenizer.pad_token_id or 0
    t = time.perf_counter()
    loop_tokens = 0
    for k in loop_idx:
        i, s = samples[k]
        r = rows[i]
        torch.manual_seed(derive_seed(seed, "bench-loop", k))
        inj = Injection.build(r.delta[None], [r.alpha], [r.position], r.scaling)
        ids = torch.as_tensor([list(r.context)], device=lm.input_device)
        with injecting(lm.model, layer, inj, once=True):
            out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                    temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                                    eos_token_id=stop, pad_token_id=pad)
        loop_tokens += out.shape[1] - ids.shape[1]
    loop_s = time.perf_counter() - t
    batched_rate = len(samples) / batched_s
    loop_rate = len(loop_idx) / loop_s if loop_idx else float("nan")
    return {"samples_batched": len(samples), "samples_loop": len(loop_idx), "prompts": len(prompt_ids),
            "seeds": seeds, "max_new_tokens": max_new_tokens, "tokens_batched": n_tokens,
            "tokens_loop": loop_tokens, "seconds_batched": batched_s, "seconds_loop": loop_s,
            "completions_per_s_batched": batched_rate, "completions_per_s_loop": loop_rate,
            "ratio": batched_rate / loop_rate,
            "loop_sampled": "every k-th (cell, seed) sample in grid order"}
