"""Peak resident memory per stage of a steercmp run, against the largest single model.

The runner records memory at every model load and at the end of every stage in
``<run>/manifest.json`` under ``memory`` (RSS and its high-water mark since the last load, the
bytes of the resident model, CUDA peaks on GPU). This script prints that per stage and checks
issue 20's target: peak resident memory, net of the process baseline, <= 2 x the largest single
model (an earlier target was 1.25x).

Usage:
    python scripts/measure_memory.py artifacts/embedded          # read an existing run
    python scripts/measure_memory.py artifacts/embedded --run    # run the embedded default first
    python scripts/measure_memory.py RUN --json out.json

A cold run's builders (the mini NLA pair, the embedded SAE) run in their own processes; their
peaks are listed under the stage that started them and summarised on a line of their own.

Two ratios are printed: ``peak / largest model`` (the literal figure; on a 270M model the
process's fixed cost, Python + torch + tokenizers, about 0.4-0.6 GiB, is a large share of it) and
``(peak - baseline) / largest model`` with ``baseline`` the RSS of a fresh interpreter that has
imported torch, transformers and steercmp (measured by this script), which is the figure that
scales to 12B (the tokenizer and working memory still count against it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

LIMIT = 2.0


def gib(n: float | int | None) -> str:
    return "-" if n is None else f"{n / 2**30:6.2f} GiB"


def import_baseline() -> int:
    """RSS of a fresh interpreter after importing torch, transformers and steercmp (no model)."""
    code = ("import torch, transformers, steercmp.run.runner, steercmp.score.sweep; "
            "from steercmp.lm.memory import rss_bytes; print(rss_bytes())")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    try:
        return int(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return 0


def summarize(memory: list[dict], baseline: int | None = None) -> dict:
    largest = max((e.get("model_bytes") or 0 for e in memory), default=0)
    peaks = [e.get("peak_rss_bytes") or e.get("rss_bytes") or 0 for e in memory]
    peak = max(peaks, default=0)
    cuda_peak = max((e.get("cuda_peak_bytes") or 0 for e in memory), default=0)
    out = {"largest_model_bytes": largest, "peak_rss_bytes": peak, "baseline_bytes": baseline,
           "ratio": peak / largest if largest else None,
           "ratio_above_baseline": (peak - (baseline or 0)) / largest if largest else None,
           "cuda_peak_bytes": cuda_peak or None, "limit": LIMIT,
           "build_process_peak_bytes": max((b.get("peak_rss_bytes") or 0 for e in memory
                                            for b in e.get("build_processes") or []), default=0) or None}
    out["met"] = out["ratio_above_baseline"] is not None and out["ratio_above_baseline"] <= LIMIT
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", nargs="?", default="artifacts/embedded")
    ap.add_argument("--run", action="store_true", help="run `steercmp run` (embedded default) into run_dir first")
    ap.add_argument("--experiment", default=None, help="experiment YAML for --run")
    ap.add_argument("--json", default=None, help="also write the summary as JSON here")
    args = ap.parse_args(argv)
    run_dir = Path(args.run_dir)
    if args.run:
        cmd = [sys.executable, "-m", "steercmp", "run", "--out", str(run_dir), "--no-progress"]
        if args.experiment:
            cmd.insert(4, args.experiment)
        subprocess.run(cmd, check=True)
    manifest = run_dir / "manifest.json"
    if not manifest.exists():
        print(f"measure_memory: error: no manifest.json in {run_dir}; fix: run with --run or point at a run",
              file=sys.stderr)
        return 2
    memory = json.loads(manifest.read_text()).get("memory", [])
    if not memory:
        print("measure_memory: error: manifest.json has no `memory` readings", file=sys.stderr)
        return 2
    print(f"{'stage':<40} {'resident':<28} {'model':>11} {'rss':>11} {'peak rss':>11}")
    print("-" * 106)
    for e in memory:
        stage = ("first report: " if e.get("pass") == "first_report" else "") + str(e.get("stage"))
        print(f"{stage[:40]:<40} {str(e.get('resident'))[:28]:<28} {gib(e.get('model_bytes')):>11} "
              f"{gib(e.get('rss_bytes')):>11} {gib(e.get('peak_rss_bytes')):>11}")
        for b in e.get("build_processes") or []:
            print(f"{'  build process: ' + str(b.get('what'))[:23]:<40} {'(its own process)':<28} {'':>11} {'':>11} "
                  f"{gib(b.get('peak_rss_bytes')):>11}")
    s = summarize(memory, import_baseline())
    print()
    print(f"largest single model: {gib(s['largest_model_bytes'])}; peak resident: {gib(s['peak_rss_bytes'])}; "
          f"import baseline (python + torch + transformers + steercmp): {gib(s['baseline_bytes'])}")
    print(f"peak / largest model: {s['ratio']:.2f}   (peak - baseline) / largest model: "
          f"{s['ratio_above_baseline']:.2f}   target <= {LIMIT}: {'met' if s['met'] else 'NOT met'}")
    builds = [b for e in memory for b in e.get("build_processes") or []]
    if builds:
        top = max(builds, key=lambda b: b.get("peak_rss_bytes") or 0)
        net = ((top.get("peak_rss_bytes") or 0) - (s["baseline_bytes"] or 0)) / max(s["largest_model_bytes"], 1)
        print(f"build processes (the cold run's builders, each in its own process while the run waits): peak "
              f"{gib(top.get('peak_rss_bytes'))} ({top.get('what')}), (peak - baseline) / largest run model: {net:.2f}")
    if s["cuda_peak_bytes"]:
        print(f"CUDA allocator peak: {gib(s['cuda_peak_bytes'])}")
    if args.json:
        Path(args.json).write_text(json.dumps({"run_dir": str(run_dir), "stages": memory, "summary": s}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
