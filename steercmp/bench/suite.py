"""One benchmark run: every path on one grid, their agreement with steercmp's sweep, the ratios
against the targets, and the table ``steercmp bench`` prints."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch

from steercmp.bench.completions import CompletionBench, completion_bench
from steercmp.bench.grid import ALPHAS, CONDITIONS, bench_cells, subsample
from steercmp.bench.scoring_paths import (
    bound_times,
    loop_scores,
    max_abs_diff,
    nnsight_scores,
    wrap_nnsight,
)
from steercmp.lm.load import LoadedModel
from steercmp.score.full_forward import group_rows, score_rows
from steercmp.score.sweep import score_rows_fast

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

    agreement = _compare_paths(lm, layer, rows, fast, timings, sizes, block, log)
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
                   timings: dict[str, dict[str, Any]], sizes: PathSizes,
                   block: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Time the other paths (a: per-cell loop, b: nnsight, c: batched full forward) on
    ``sizes`` cells each (None: all), whole blocks of ``block`` grid cells evenly spaced,
    into ``timings``; return their agreement with the fast sweep (d)."""
    loop_cells, nnsight_cells, batched_cells = sizes.loop_cells, sizes.nnsight_cells, sizes.batched_cells
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
