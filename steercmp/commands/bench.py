"""``steercmp bench``: steercmp's scoring sweep against the usual ways of running a steering grid.

On ONE set of cells (prompt x condition x alpha) it times four implementations of the same score
(family log-mass at the scoring slot, see :mod:`steercmp.score.forms`):

- (a) ``loop``: the usual loop, one full forward (all positions, all logits) per cell with a
  forward hook (:func:`steercmp.lm.hooks.injecting`) adding the delta;
- (b) ``nnsight``: the same cells through nnsight, one ``trace`` per cell, the residual edit
  written inside the trace;
- (c) ``batched``: AxBench-style batching, per-row deltas, a full forward of every row
  (:func:`steercmp.score.full_forward.score_rows`);
- (d) ``steercmp``: :func:`steercmp.score.sweep.score_rows_fast` (prefix KV cache, blocks L+1..N only,
  logits at the scoring slot and branch tokens only).

and the minimal-recomputation bound: the batched pass of blocks L+1..N over the injected
positions with last-position logits only, on the same rows (``bound``), plus the same pass with
the multi-token branch tokens a family score cannot avoid (``bound_with_branches``).

Every path's scores must agree with (d) to ``1e-4`` on every cell it ran; the benchmark fails
(exit 1) otherwise. (a), (b) and optionally (c) run on a deterministic subsample of the cells
(every k-th cell in grid order, k coprime with the conditions x alphas block so every condition
and alpha is covered); their cells/second are measured on that subsample and the JSON says so.

Deltas (no extra model): ``target_edit`` / ``unrelated_edit`` use the ``unembed_direction``
method's math (:func:`steercmp.lm.readout.readout_directions`: unit difference of mean unembedding rows, scaled to 0.25 of
the residual norm at the injection position); ``noop`` is zero; ``random_delta`` is a random
direction with the target delta's norm, seeded per prompt from (seed, prompt id);
``wrong_position`` is the target delta one token earlier. Scaling ``raw``.

Completions: steercmp's batched sampling (:func:`steercmp.score.sample.generate_rows`, one batch
per prompt, per-row deltas and generators) against a per-sample loop (one HF ``generate`` per
sample with the injection hook), both stopping at the first line break.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch

from steercmp.battery import Battery
from steercmp.battery_files import experiments_dir
from steercmp.hashing import derive_seed, make_generator
from steercmp.lm.capture import extract
from steercmp.lm.hooks import Injection, injecting
from steercmp.lm.load import LoadedModel, load_base_model
from steercmp.lm.prompts import pad_batch
from steercmp.lm.readout import readout_directions
from steercmp.paths import writable_file
from steercmp.score.forms import branch_sequences, family_forms, logmass_from_logits
from steercmp.score.full_forward import ScoreRow, group_rows, score_rows
from steercmp.score.sample import Decoding, _newline_ids, generate_rows
from steercmp.score.sweep import (
    auto_batch_size,
    branch_pass,
    prepare_context,
    score_rows_fast,
    suffix_pass,
)

CONDITIONS = ("target_edit", "unrelated_edit", "noop", "random_delta", "wrong_position")
ALPHAS = (-2.0, -1.0, 0.0, 1.0, 2.0, 4.0, 8.0)
FAMILIES = ("original", "edited", "unrelated")
TOLERANCE = 1e-4
TARGETS = {"d/a": 20.0, "d/b": 20.0, "d/c": 2.0, "d/bound": 1.15, "completions": 5.0}
#: ``--quick``: the full grid for (d) and the bounds, the slow baselines on sampled cells, so the
#: bench ends in minutes on a 2-core CPU while every ratio is still printed (rates are per cell)
QUICK = {"loop_cells": 35, "nnsight_cells": 35, "batched_cells": 245}


@attrs.frozen
class PathSizes:
    """How many grid cells each slow path times (None: every cell): (a) the per-cell loop,
    (b) nnsight, (c) AxBench-style batching."""

    loop_cells: int | None = 70
    nnsight_cells: int | None = 70
    batched_cells: int | None = None


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
DEFAULT_BATTERY = experiments_dir() / "batteries" / "expanded.yaml"


# ----------------------------------------------------------------------------- grid
def bench_cells(lm: LoadedModel, layer: int, prompts: Sequence[Any], *, seed: int = 0,
                alphas: Sequence[float] = ALPHAS, norm_fraction: float = 0.25
                ) -> tuple[list[dict[str, Any]], list[ScoreRow]]:
    """Cells (prompt x condition x alpha, grid order) and their score rows. A prompt whose families
    share their unembedding rows (a tiny test tokenizer's ``<unk>``) gets a zero direction."""
    contexts = extract(lm, layer, prompts)
    cells: list[dict[str, Any]] = []
    rows: list[ScoreRow] = []
    for ctx in contexts:
        fams = ctx.prompt.families
        forms = family_forms(lm.tokenizer, fams)
        orig = readout_directions(lm, fams["original"]).mean(0)
        h_norm = float(ctx.activation.norm())
        prop = {}
        for fam in ("edited", "unrelated"):
            direction = readout_directions(lm, fams[fam]).mean(0) - orig
            prop[fam] = direction / direction.norm().clamp_min(1e-12) * norm_fraction * h_norm
        g = make_generator(seed, "bench", ctx.prompt.id, "random_delta")
        rnd = torch.randn(ctx.d_model, generator=g)
        spec = {
            "target_edit": (prop["edited"], ctx.inject_pos),
            "unrelated_edit": (prop["unrelated"], ctx.inject_pos),
            "noop": (torch.zeros(ctx.d_model), ctx.inject_pos),
            "random_delta": (rnd / rnd.norm() * prop["edited"].norm(), ctx.inject_pos),  # same norm
            "wrong_position": (prop["edited"], ctx.inject_pos - 1),
        }
        for cond in CONDITIONS:
            delta, pos = spec[cond]
            for alpha in alphas:
                cells.append({"prompt_id": ctx.prompt.id, "condition": cond, "alpha": float(alpha)})
                rows.append(ScoreRow(ctx.input_ids, ctx.score_pos, forms, delta.float(), float(alpha), pos, "raw"))
    return cells, rows


def subsample(n: int, target: int | None, block: int) -> list[int]:
    """Every k-th index (k coprime with ``block``) so a subsample covers every condition/alpha."""
    if target is None or target >= n:
        return list(range(n))
    k = max(1, math.ceil(n / max(target, 1)))
    while block > 1 and math.gcd(k, block) != 1:
        k += 1
    return list(range(0, n, k))


# ----------------------------------------------------------------------------- paths
@torch.no_grad()
def loop_scores(lm: LoadedModel, layer: int, rows: Sequence[ScoreRow]) -> dict[str, torch.Tensor]:
    """(a) One full forward per cell (every position's logits) with a forward hook."""
    out = {f: torch.empty(len(rows)) for f in FAMILIES}
    pad = lm.tokenizer.pad_token_id or 0
    for i, r in enumerate(rows):
        seqs = branch_sequences(r.context, r.forms)
        ids, mask, _ = pad_batch(seqs, pad, side="right")
        inj = Injection.build(r.delta[None], [r.alpha], [r.position], r.scaling).repeat_interleave(len(seqs))
        with injecting(lm.model, layer, inj):
            logits = lm.model(input_ids=ids.to(lm.input_device), attention_mask=mask.to(lm.input_device)).logits
        start = len(r.context) - 1
        masses = logmass_from_logits(logits[:, start:start + r.forms.max_branch + 1].float().cpu(), r.forms)
        for f in FAMILIES:
            out[f][i] = masses[f][0]
    return out


@torch.no_grad()
def nnsight_scores(lm: LoadedModel, layer: int, rows: Sequence[ScoreRow], nn_model: Any = None
                   ) -> dict[str, torch.Tensor]:
    """(b) One nnsight trace per cell; the residual edit is written inside the trace (raw scaling)."""
    if nn_model is None:
        nn_model = wrap_nnsight(lm)
    out = {f: torch.empty(len(rows)) for f in FAMILIES}
    pad = lm.tokenizer.pad_token_id or 0
    blocks = _nnsight_blocks(nn_model)
    for i, r in enumerate(rows):
        if r.scaling != "raw":
            raise ValueError("the nnsight path implements raw scaling only")
        seqs = branch_sequences(r.context, r.forms)
        ids, mask, _ = pad_batch(seqs, pad, side="right")
        add = (r.alpha * r.delta).to(lm.input_device)
        with nn_model.trace({"input_ids": ids.to(lm.input_device), "attention_mask": mask.to(lm.input_device)}):
            hidden = blocks[layer].output
            if isinstance(hidden, tuple):
                hidden = hidden[0]
            hidden[:, r.position] += add.to(hidden.dtype)
            logits = nn_model.output.logits.save()
        start = len(r.context) - 1
        masses = logmass_from_logits(logits[:, start:start + r.forms.max_branch + 1].float().cpu(), r.forms)
        for f in FAMILIES:
            out[f][i] = masses[f][0]
    return out


def wrap_nnsight(lm: LoadedModel) -> Any:
    """nnsight's LanguageModel around a COPY of the model: nnsight replaces the forwards of the
    modules it wraps, which would otherwise slow every other path measured after it."""
    import copy
    import warnings

    from nnsight import LanguageModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LanguageModel(copy.deepcopy(lm.model), tokenizer=lm.tokenizer)


def _nnsight_blocks(nn_model: Any) -> Any:
    inner = nn_model.model
    return inner.layers if hasattr(inner, "layers") else inner.language_model.layers


@torch.no_grad()
def bound_times(lm: LoadedModel, layer: int, rows: Sequence[ScoreRow], batch_size: int | str = "auto"
                ) -> tuple[float, float]:
    """Seconds of (1) the bare pass of blocks L+1..N over the injected positions with the scoring
    slot's logits only, and (2) the same plus the branch-token pass, on the same rows and chunks
    as :func:`steercmp.score.sweep.score_rows_fast` (the once-per-context preparation is not timed)."""

    pad = lm.tokenizer.pad_token_id or 0
    bare = with_branches = 0.0
    for idx in group_rows(rows).values():
        first = rows[idx[0]]
        prep = prepare_context(lm, layer, first.context, first.forms, min(rows[i].position for i in idx), pad)
        size = batch_size if isinstance(batch_size, int) else auto_batch_size(
            lm, prep.h_ctx.shape[0], len(first.forms.branches), prep.max_branch + 1)
        for s in range(0, len(idx), size):
            chunk = idx[s:s + size]
            inj = Injection.build([rows[i].delta for i in chunk], [rows[i].alpha for i in chunk],
                                  [rows[i].position for i in chunk], [rows[i].scaling for i in chunk])
            t = time.perf_counter()
            suffix_pass(lm.model, layer, prep, inj)
            bare += time.perf_counter() - t
            t = time.perf_counter()
            _, cache = suffix_pass(lm.model, layer, prep, inj, keep_cache=prep.n_branches > 0)
            if prep.n_branches:
                branch_pass(lm.model, layer, prep, cache, len(chunk))
            with_branches += time.perf_counter() - t
    return bare, with_branches


def max_abs_diff(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], index: Sequence[int]) -> float:
    idx = torch.as_tensor(list(index), dtype=torch.long)
    return max(float((got[f] - ref[f][idx]).abs().max()) for f in FAMILIES) if len(idx) else 0.0


# ----------------------------------------------------------------------------- completions
@torch.no_grad()
def completion_bench(lm: LoadedModel, layer: int, rows: Sequence[ScoreRow], cells: Sequence[dict[str, Any]],
                     size: CompletionBench) -> dict[str, Any]:
    """Batched sampling (one :func:`generate_rows` call per prompt) vs one ``generate`` per sample."""
    n_prompts, seeds, max_new_tokens, loop_samples, seed = attrs.astuple(size)
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


# ----------------------------------------------------------------------------- driver
def run_bench(lm: LoadedModel, layer: int, prompts: Sequence[Any], *, sizes: PathSizes = PathSizes(),
              completions: CompletionBench | None = None, log: Callable[[str], None] = print,
              alphas: Sequence[float] = ALPHAS) -> dict[str, Any]:
    """Time every path on one grid, check agreement, and return the numbers (see module doc)."""

    cells, rows = bench_cells(lm, layer, prompts, alphas=alphas)
    n = len(rows)
    block = len(CONDITIONS) * len(alphas)
    log(f"[bench] {len(prompts)} prompts x {len(CONDITIONS)} conditions x {len(alphas)} alphas = {n} cells, "
        f"layer {layer}, threads {torch.get_num_threads()}")
    # warm-up (first calls pay allocator and kernel-selection costs); not timed
    warm = group_rows(rows)[next(iter(group_rows(rows)))][:4]
    score_rows_fast(lm, layer, [rows[i] for i in warm])
    score_rows(lm, layer, [rows[i] for i in warm[:1]])

    timings: dict[str, dict[str, Any]] = {}
    t = time.perf_counter()
    fast = score_rows_fast(lm, layer, rows)
    timings["d"] = {"name": "steercmp score_rows_fast", "cells": n, "seconds": time.perf_counter() - t}
    log(f"[bench] (d) steercmp: {n} cells in {timings['d']['seconds']:.1f} s")

    bare, with_br = bound_times(lm, layer, rows)
    timings["bound"] = {"name": "blocks L+1..N over injected positions, last-position logits", "cells": n,
                        "seconds": bare}
    timings["bound_with_branches"] = {"name": "bound plus the multi-token branch-token pass", "cells": n,
                                      "seconds": with_br}
    log(f"[bench] bound: {bare:.1f} s, with branches {with_br:.1f} s")

    agreement = _compare_paths(lm, layer, rows, fast, timings, attrs.astuple(sizes), block, log)
    for v in timings.values():
        v["cells_per_s"] = v["cells"] / v["seconds"] if v["seconds"] > 0 else float("inf")
    rate = {k: v["cells_per_s"] for k, v in timings.items()}
    ratios = {"d/a": rate["d"] / rate["a"], "d/c": rate["d"] / rate["c"],
              # time ratio: how many times the bound's time (d) takes (lower is better)
              "d/bound": timings["d"]["seconds"] / timings["bound"]["seconds"],
              "d/bound_with_branches": timings["d"]["seconds"] / timings["bound_with_branches"]["seconds"]}
    if "b" in rate:
        ratios["d/b"] = rate["d"] / rate["b"]
    result: dict[str, Any] = {
        "grid": {"prompts": len(prompts), "conditions": list(CONDITIONS), "alphas": list(alphas),
                 "cells": n, "layer": layer, "scaling": "raw",
                 "deltas": "target/unrelated: unembed_direction math (norm_fraction 0.25); noop zero; "
                           "random_delta: random direction, target norm, seeded per prompt; "
                           "wrong_position: target delta at inject_pos-1"},
        "timings": timings, "ratios": ratios, "agreement": agreement, "tolerance": TOLERANCE,
    }
    if completions:
        comp = completion_bench(lm, layer, rows, cells, completions)
        result["completions"] = comp
        ratios["completions"] = comp["ratio"]
        log(f"[bench] completions: batched {comp['completions_per_s_batched']:.2f}/s, "
            f"loop {comp['completions_per_s_loop']:.2f}/s")
    result["targets"] = {
        k: {"target": f"{'<=' if k == 'd/bound' else '>='} {v:g}", "measured": ratios.get(k),
            "met": None if ratios.get(k) is None else
            (ratios[k] <= v if k == "d/bound" else ratios[k] >= v)}
        for k, v in TARGETS.items()}
    result["all_agree"] = all(a["ok"] for a in agreement.values())
    return result


def _compare_paths(lm: LoadedModel, layer: int, rows: Sequence[Any], fast: dict[str, torch.Tensor],
                   timings: dict[str, dict[str, Any]], cells: tuple[int | None, int | None, int | None],
                   block: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Time the other paths (a: per-cell loop, b: nnsight, c: batched full forward) on
    ``cells = (a, b, c)`` cells each (None: all), whole blocks of ``block`` grid cells evenly spaced,
    into ``timings``; return their agreement with the fast sweep (d)."""
    loop_cells, nnsight_cells, batched_cells = cells
    n = len(rows)
    agreement: dict[str, Any] = {}
    paths = [("c", "AxBench-style batched full forward (engine.score_rows)", batched_cells,
              lambda sub: score_rows(lm, layer, sub)),
             ("a", "usual loop: full forward + hook per cell", loop_cells,
              lambda sub: loop_scores(lm, layer, sub))]
    try:
        nn_model = wrap_nnsight(lm)
    except ImportError:
        log("[bench] (b) skipped: nnsight is not installed (pip install 'steercmp[dev]')")
    else:
        paths.append(("b", "nnsight: one trace per cell", nnsight_cells,
                      lambda sub: nnsight_scores(lm, layer, sub, nn_model)))
    for key, name, target, fn in paths:
        idx = subsample(n, target, block)
        sub = [rows[i] for i in idx]
        t = time.perf_counter()
        got = fn(sub)
        secs = time.perf_counter() - t
        timings[key] = {"name": name, "cells": len(idx), "seconds": secs,
                        "sampled": None if len(idx) == n else
                        f"every {idx[1] - idx[0] if len(idx) > 1 else n}-th cell in grid order ({len(idx)} of {n})"}
        diff = max_abs_diff(got, fast, idx)
        agreement[key] = {"cells_checked": len(idx), "max_abs_diff": diff, "ok": diff <= TOLERANCE}
        log(f"[bench] ({key}) {name}: {len(idx)} cells in {secs:.1f} s, max |diff| vs (d) {diff:.2e}")
    return agreement


def environment(lm: LoadedModel | None = None) -> dict[str, Any]:
    import os

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    dtype = str(lm.dtype).replace("torch.", "") if lm is not None else "float32"
    return {"device": "cpu", "dtype": dtype, "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_count": os.cpu_count(), "load_average": load, "platform": platform.platform(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else
            "none available in this session (no bf16 GPU figures)"}


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{'path':<20} {'cells':>6} {'seconds':>9} {'cells/s':>9}  what", "-" * 88]
    for key in ("a", "b", "c", "d", "bound", "bound_with_branches"):
        t = result["timings"].get(key)
        if t:
            lines.append(f"{key:<20} {t['cells']:>6} {t['seconds']:>9.2f} {t['cells_per_s']:>9.2f}  {t['name']}")
    comp = result.get("completions")
    if comp:
        lines.append(f"completions: batched {comp['completions_per_s_batched']:.2f}/s "
                     f"({comp['samples_batched']} samples), per-sample loop "
                     f"{comp['completions_per_s_loop']:.2f}/s ({comp['samples_loop']} samples)")
    lines += ["", f"{'target':<14} {'goal':>8} {'measured':>10}  met", "-" * 42]
    for k, t in result["targets"].items():
        m = t["measured"]
        lines.append(f"{k:<14} {t['target']:>8} {(f'{m:.2f}') if m is not None else '-':>10}  "
                     f"{'met' if t['met'] else ('not met' if t['met'] is not None else '-')}")
    lines.append(f"{'d/bound+br':<14} {'(info)':>8} {result['ratios']['d/bound_with_branches']:>10.2f}")
    lines += ["", "agreement with (d), every cell each path ran (tolerance 1e-4):"]
    for k, a in result["agreement"].items():
        lines.append(f"  ({k}) {a['cells_checked']} cells, max |diff| {a['max_abs_diff']:.2e}: "
                     f"{'ok' if a['ok'] else 'DISAGREE'}")
    lines.append(f"gpu: {result['environment']['gpu']}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``steercmp bench`` (cli.py defines --out, --battery and --quick)."""
    parser.add_argument("--out", default="artifacts/bench.json")
    parser.add_argument("--battery", default=None, help="battery YAML (default: expanded.yaml)")
    parser.add_argument("--quick", action="store_true",
                        help="the full grid with the slow baselines on sampled cells (minutes on a 2-core CPU)")
    parser.add_argument("--smoke", action="store_true", help="two prompts, a handful of cells (a smoke test)")
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--prompts", type=int, default=None, help="use the first N prompts")
    parser.add_argument("--loop-cells", type=int, default=70, help="cells timed for (a)")
    parser.add_argument("--nnsight-cells", type=int, default=70, help="cells timed for (b)")
    parser.add_argument("--batched-cells", type=int, default=None, help="cells timed for (c) (default all)")
    parser.add_argument("--no-completions", action="store_true")


def main(args: argparse.Namespace, lm: LoadedModel | None = None) -> int:
    """Entry point of ``steercmp bench``; ``lm`` lets tests pass a tiny model."""
    out = writable_file(getattr(args, "out", None) or "artifacts/bench.json", where="--out")
    quick, smoke = bool(getattr(args, "quick", False)), bool(getattr(args, "smoke", False))
    battery = Battery.from_yaml(getattr(args, "battery", None) or DEFAULT_BATTERY)
    n_prompts = getattr(args, "prompts", None) or (2 if smoke else None)
    prompts = list(battery.prompts[:n_prompts] if n_prompts else battery.prompts)
    if lm is None:
        lm = load_base_model(progress=False)
    layer = getattr(args, "layer", None)
    layer = 12 if layer is None else layer
    layer = min(layer, lm.num_layers - 1)
    def sample(name: str, full: int | None) -> int | None:
        if smoke:
            return 8 if name != "batched_cells" else None
        return QUICK[name] if quick else getattr(args, name, full)

    completions = None if getattr(args, "no_completions", False) else (
        SMOKE_COMPLETIONS if smoke else QUICK_COMPLETIONS if quick else FULL_COMPLETIONS)
    sizes = PathSizes(loop_cells=sample("loop_cells", 70), nnsight_cells=sample("nnsight_cells", 70),
                      batched_cells=sample("batched_cells", None))
    result = run_bench(lm, layer, prompts, sizes=sizes, completions=completions,
                       log=lambda m: print(m, file=sys.stderr))
    result["environment"] = environment(lm)
    result["model"] = lm.source
    result["mode"] = "smoke" if smoke else "quick" if quick else "full"
    out.write_text(json.dumps(result, indent=2, default=str))
    print(format_table(result))
    print(f"\nwritten to {out}")
    if not result["all_agree"]:
        bad = [k for k, a in result["agreement"].items() if not a["ok"]]
        print(f"steercmp bench: error: paths {bad} disagree with steercmp's scores beyond {TOLERANCE}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="steercmp bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    raise SystemExit(main(p.parse_args()))
