"""How far each stage of a steercmp run is from what this machine's matrix multiplications allow.

Issue 20's time targets ask for a 2x faster run. This script says where a 2x could come from: it
counts every linear layer's arithmetic while a run (or the mini NLA pair's build) executes, and
prices each call on a roofline measured on this machine, so the floor of a stage is what its
matmuls alone would take at the best speed this CPU reaches, with nothing else (no Python, no
softmax, no sampling, no data movement outside the weights). A stage near its floor can only get
faster by doing less arithmetic; a stage far above it has overhead left to remove.

How a call is priced: ``max(flops / P, weight_bytes / B)``, with ``P`` the best matmul throughput
measured here in the compute dtype (over the model's own shapes: the MLP's, the attention's and the
262k-row vocabulary head's, 256 rows each) and ``B`` the rate at which a one-row product streams
the vocabulary head's weights (memory bandwidth). Training passes add the backward's products
(input and weight gradients, where they are needed). Only ``nn.Linear`` calls are counted:
attention's own products (at steercmp's contexts, under 100 tokens, under 3% of a block's linear
layers), the mini AV's restricted-vocabulary head in training and sae-lens's SAE products are
not. The floor is therefore a lower bound, and the ratio ``measured / floor`` an upper bound on
what removing every overhead could gain. The roofline is measured afresh by every call (best of
five per shape); on these shared machines it moves by about 10% between calls.

Usage (the caches built first: a build inside the counted run would count as its stage's time):
    python scripts/arithmetic_floor.py --out /tmp/floor-run            # the embedded default, warm
    python scripts/arithmetic_floor.py EXPERIMENT.yaml --out DIR --json floor.json
    python scripts/arithmetic_floor.py --build mini-pair              # the mini pair's build, counted

The counting hooks cost well under a millisecond per decoding step; the stage times printed are
those of the counted run (its manifest's ``timings_seconds``). ``in linear s`` is the wall time
the linear layers' forward calls took (the backward's is not clocked): a stage's time less that is
spent outside its linear layers, and that time over the floor says how close the matmuls
themselves run to the roofline.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import torch

ROOT = Path(__file__).resolve().parents[1]
#: (rows, in, out): the embedded model's MLP, attention output and vocabulary head products
SHAPES = ((256, 640, 2048), (256, 2048, 640), (256, 1024, 640), (256, 640, 262144))
HEAD = (640, 262144)


@attrs.frozen
class Roofline:
    """``peak``: best multiply-add throughput (FLOP/s) per compute dtype; ``bandwidth``: bytes/s
    at which a one-row product streams a weight matrix too large for the caches."""

    peak: dict[torch.dtype, float]
    bandwidth: float

    def seconds(self, flops: float, weight_bytes: float, dtype: torch.dtype) -> float:
        return max(flops / self.peak.get(dtype, self.peak[torch.float32]), weight_bytes / self.bandwidth)


def _best_seconds(fn: Callable[[], Any], reps: int = 5) -> float:
    fn()  # kernel selection
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_roofline(dtypes: tuple[torch.dtype, ...]) -> Roofline:
    """Time this machine's matmuls at the model's shapes, in each compute dtype."""
    gen = torch.Generator().manual_seed(0)
    peak = {}
    for dtype in dtypes:
        rates = []
        for rows, k, n in SHAPES:
            x = torch.randn(rows, k, generator=gen).to(dtype)
            w = torch.randn(n, k, generator=gen).to(dtype)
            rates.append(2 * rows * k * n / _best_seconds(lambda x=x, w=w: torch.nn.functional.linear(x, w)))
        peak[dtype] = max(rates)
    dtype = dtypes[-1]
    x = torch.randn(1, HEAD[0], generator=gen).to(dtype)
    w = torch.randn(HEAD[1], HEAD[0], generator=gen).to(dtype)
    bandwidth = w.numel() * w.element_size() / _best_seconds(lambda: torch.nn.functional.linear(x, w))
    return Roofline(peak, bandwidth)


@attrs.define
class Tally:
    """One span's linear products: FLOPs (backward included), their floor, and the wall time the
    forward calls actually took (the backward's is not clocked)."""

    flops: float = 0.0
    floor_seconds: float = 0.0
    calls: int = 0
    forward_seconds: float = 0.0

    def add(self, other: Tally) -> None:
        self.flops += other.flops
        self.floor_seconds += other.floor_seconds
        self.calls += other.calls
        self.forward_seconds += other.forward_seconds


@attrs.define
class Recorder:
    """Counts every ``nn.Linear`` call into the current span; ``mark(label)`` closes the span
    since the previous mark under ``label`` (spans with one label add up)."""

    roofline: Roofline
    spans: dict[str, Tally] = attrs.Factory(dict)
    open: Tally = attrs.Factory(Tally)
    started: float = 0.0

    def mark(self, label: str) -> None:
        self.spans.setdefault(label, Tally()).add(self.open)
        self.open = Tally()

    def start(self, module: torch.nn.Module, _args: tuple[Any, ...]) -> None:
        if isinstance(module, torch.nn.Linear):
            self.started = time.perf_counter()

    def linear(self, module: torch.nn.Module, args: tuple[Any, ...], _output: Any) -> None:
        if not isinstance(module, torch.nn.Linear) or not args or not isinstance(args[0], torch.Tensor):
            return
        self.open.forward_seconds += time.perf_counter() - self.started  # CPU ops are synchronous
        x = args[0]
        k, n = module.in_features, module.out_features
        rows = x.numel() // k
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        flops, weight_bytes = 2.0 * rows * k * n, k * n * module.weight.element_size()
        grad = torch.is_grad_enabled()
        passes = 1 + int(grad and module.weight.requires_grad) + int(grad and x.requires_grad)
        self.open.flops += passes * flops
        self.open.floor_seconds += passes * self.roofline.seconds(flops, weight_bytes, dtype)
        self.open.calls += passes

    @contextmanager
    def counting(self) -> Iterator[None]:
        handles = (torch.nn.modules.module.register_module_forward_pre_hook(self.start),
                   torch.nn.modules.module.register_module_forward_hook(self.linear))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


class MarkingTimings(dict):
    """A run's ``timings_seconds`` that closes a span whenever a stage (or a method's propose)
    records its time, so each stage's arithmetic is read where its clock is."""

    STAGES = ("extract", "score", "completions")

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __setitem__(self, key: str, value: float) -> None:
        if key in self.STAGES or key.startswith("propose:"):
            self.recorder.mark(key)
        super().__setitem__(key, value)


def count_run(runner: Any, recorder: Recorder) -> dict[str, float]:
    """Run every stage of ``runner`` with each stage's arithmetic counted; returns its timings."""
    from steercmp.run import stage_match

    runner.ledger.timings = runner.timings = MarkingTimings(recorder)
    sample = stage_match.matched_completions

    def labelled(*args: Any, **kwargs: Any) -> Any:  # the match stage: dose search, then its samples
        recorder.mark("match:dose")
        try:
            return sample(*args, **kwargs)
        finally:
            recorder.mark("match:completions")

    stage_match.matched_completions = labelled
    try:
        with recorder.counting():
            runner.run()
    finally:
        stage_match.matched_completions = sample
    recorder.mark("match:dose")  # the last prompt's dose search and the assembly
    return dict(runner.timings)


def count_mini_pair_build(recorder: Recorder) -> dict[str, float]:
    """Build the mini NLA pair in this process, into a temporary folder, counting each stage."""
    sys.path.insert(0, str(ROOT))
    from plugins.nla.mini import build

    lap = build._Build.lap

    def marking(self: Any, stage: str) -> None:
        recorder.mark(f"build:{stage}")
        lap(self, stage)

    build._Build.lap = marking
    try:
        with tempfile.TemporaryDirectory() as tmp, recorder.counting():
            log = build.build_mini_pair(Path(tmp) / "mini", progress=False)
    finally:
        build._Build.lap = lap
    return {f"build:{k}": v for k, v in log["stage_seconds"].items()}


def table(timings: dict[str, float], recorder: Recorder) -> list[dict[str, Any]]:
    rows = []
    for label, tally in recorder.spans.items():
        measured = timings.get(label)
        rows.append({"stage": label, "measured_seconds": measured, "gflop": tally.flops / 1e9,
                     "floor_seconds": tally.floor_seconds, "linear_calls": tally.calls,
                     "linear_forward_seconds": tally.forward_seconds,
                     "measured_over_floor": measured / tally.floor_seconds
                     if measured and tally.floor_seconds else None})
    return rows


def print_table(rows: list[dict[str, Any]], roofline: Roofline) -> None:
    peaks = ", ".join(f"{str(d).removeprefix('torch.')} {p / 1e9:.0f} GFLOP/s" for d, p in roofline.peak.items())
    print(f"roofline: {peaks}; weights streamed at {roofline.bandwidth / 1e9:.1f} GB/s")
    print(f"{'stage':28} {'measured s':>10} {'GFLOP':>10} {'floor s':>9} {'ratio':>6} {'in linear s':>11}")
    for r in rows:
        m = "-" if r["measured_seconds"] is None else f"{r['measured_seconds']:.1f}"
        ratio = "-" if r["measured_over_floor"] is None else f"{r['measured_over_floor']:.2f}"
        print(f"{r['stage']:28} {m:>10} {r['gflop']:10.0f} {r['floor_seconds']:9.1f} {ratio:>6} "
              f"{r['linear_forward_seconds']:11.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", nargs="?", help="experiment YAML (default: the embedded default)")
    parser.add_argument("--out", type=Path, help="run directory for the counted run (a new one)")
    parser.add_argument("--build", choices=["mini-pair"], help="count a build instead of a run")
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    from steercmp.lm.device import resolve_dtype_name

    run_dtype = getattr(torch, resolve_dtype_name("auto", "cpu"))
    roofline = measure_roofline((torch.float32,) if run_dtype == torch.float32 else (torch.float32, run_dtype))
    recorder = Recorder(roofline)
    if args.build:
        timings = count_mini_pair_build(recorder)
    else:
        if args.out is None or (args.out.exists() and any(args.out.iterdir())):
            parser.error("--out must name a new or empty folder (the counted run computes every stage)")
        from steercmp.battery_files import default_experiment_path
        from steercmp.config import Experiment
        from steercmp.plugin_manager import build_plugin_manager
        from steercmp.run.runner import Runner

        experiment = Experiment.from_yaml(Path(args.experiment) if args.experiment else default_experiment_path())
        runner = Runner(experiment, build_plugin_manager(), args.out, fresh=True, progress=False)
        timings = count_run(runner, recorder)
    rows = table(timings, recorder)
    print_table(rows, roofline)
    if args.json:
        args.json.write_text(json.dumps({"roofline": {"peak_flops": {str(d): p for d, p in roofline.peak.items()},
                                                      "bandwidth_bytes": roofline.bandwidth},
                                         "stages": rows, "timings_seconds": timings}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
