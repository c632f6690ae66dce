"""The device check for the first GPU: how fast and how big steercmp's V3 run is on it.

On a CUDA machine it (1) runs ``steercmp bench --quick`` on the embedded Gemma 3 270M in bf16 on
the GPU, (2) builds the V3 rehearsal at Gemma 3 12B's real widths with random weights (no
download; the AV and AR share the base model's weight files) and (3) runs the shipped
``experiments/gemma3-12b-v3.yaml``, with only the ids pointed at those directories, end to end.
It prints cells/s, the sweep's bound ratio, peak GPU memory per stage and the wall time of the
full V3 run (the rehearsal runs the whole protocol; with random weights the AV never closes its
explanation, so the NLA stage's 200-token generations are an upper bound), and writes them to
``artifacts/device_check.json``. Put the figures in docs/scaling.md.

On a machine without CUDA it says so and exits 0.

    python scripts/device_check.py [--work DIR] [--skip-bench]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent


def bench_on_gpu(out: Path) -> dict[str, Any]:
    from steercmp.commands import bench
    from steercmp.lm.load import load_base_model

    lm = load_base_model(dtype="bfloat16", device="cuda", progress=False)
    args = argparse.Namespace(out=str(out), quick=True, smoke=False, battery=None, layer=12, prompts=None,
                              loop_cells=70, nnsight_cells=70, batched_cells=None, no_completions=False)
    code = bench.main(args, lm=lm)
    result = json.loads(out.read_text())
    return {"exit": code, "bench": result}


def rehearsal_at_real_widths(work: Path) -> dict[str, Any]:
    from steercmp_plugins import v3_rehearsal

    t = time.perf_counter()
    mini = v3_rehearsal.build(work / "v3-12b-widths", v3_rehearsal.REAL_12B, device="cuda", shared_weights=True)
    build_s = time.perf_counter() - t
    config = v3_rehearsal.local_config(mini, work / "exp")
    run = work / "run"
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "steercmp", "run", str(config), "--out", str(run), "--no-progress"],
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    manifest = json.loads((run / "manifest.json").read_text()) if (run / "manifest.json").exists() else {}
    cells = 0
    if (run / "cells.parquet").exists():
        import polars as pl

        cells = pl.read_parquet(run / "cells.parquet").height
    timings = manifest.get("timings_seconds", {})
    peaks = {m["stage"]: m.get("cuda_peak_bytes") for m in manifest.get("memory", []) if "cuda_peak_bytes" in m}
    return {"exit": done.returncode, "stderr_tail": done.stderr[-2000:], "build_seconds": build_s,
            "wall_seconds": wall, "cells": cells, "score_seconds": timings.get("score"),
            "cells_per_second": cells / timings["score"] if timings.get("score") else None,
            "timings_seconds": timings, "cuda_peak_bytes_per_stage": peaks,
            "cuda_peak_gib": max((v for v in peaks.values() if v), default=0) / 2**30}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one; needs ~26 GB)")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "artifacts" / "device_check.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("device check: no CUDA GPU on this machine; nothing to measure (run it where one is)")
        return 0
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="steercmp-device-"))
    result: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0),
                              "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30}
    if not args.skip_bench:
        b = bench_on_gpu(work / "bench.json")
        sweep = b["bench"].get("sweep", {})
        result["bench"] = {"exit": b["exit"], "sweep": sweep, "completions": b["bench"].get("completions")}
        print(f"bench (270M, bf16, GPU): exit {b['exit']}; sweep {json.dumps(sweep)[:400]}")
    r = rehearsal_at_real_widths(work)
    result["v3_rehearsal_12b_widths"] = r
    print(f"V3 at 12B widths (random weights): exit {r['exit']}, {r['cells']} cells, "
          f"{r['cells_per_second'] or 0:.1f} cells/s in the score stage, peak GPU {r['cuda_peak_gib']:.1f} GiB, "
          f"full V3 run {r['wall_seconds'] / 60:.1f} min (+ {r['build_seconds']:.0f} s to build the weights)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"written to {out}")
    return 0 if r["exit"] == 0 and result.get("bench", {}).get("exit", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
