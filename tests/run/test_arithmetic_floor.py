"""scripts/arithmetic_floor.py: its count of a linear layer's arithmetic, and its attribution of a
whole run's arithmetic to the stages whose clocks the manifest keeps."""

import importlib.util
from pathlib import Path

import pytest
import torch

from steercmp.config import Experiment
from steercmp.plugin_manager import build_plugin_manager
from steercmp.run.runner import Runner
from steercmp.testing import write_tiny_experiment
from steercmp.testing.running import TINY_BUILTINS

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("arithmetic_floor", ROOT / "scripts" / "arithmetic_floor.py")
floor = importlib.util.module_from_spec(spec)
spec.loader.exec_module(floor)

#: 1 GFLOP/s and 1 GB/s: a call's floor is then its FLOPs or its weight bytes, in nanoseconds
ROOF = floor.Roofline(peak={torch.float32: 1e9}, bandwidth=1e9)


def test_a_linear_call_is_priced_on_the_roofline():
    layer = torch.nn.Linear(4, 3)
    rec = floor.Recorder(ROOF)
    with rec.counting(), torch.no_grad():
        layer(torch.zeros(5, 4))  # 2 * 5 * 4 * 3 = 120 FLOP; 48 weight bytes
        layer(torch.zeros(1, 1, 4))  # 24 FLOP, but 48 weight bytes: bound by the weights
    rec.mark("inference")
    x = torch.zeros(5, 4, requires_grad=True)
    with rec.counting():
        layer(x).sum().backward()  # forward, input gradient and weight gradient
    rec.mark("training")
    inference, training = rec.spans["inference"], rec.spans["training"]
    assert (inference.flops, inference.calls) == (144, 2)
    assert inference.floor_seconds == pytest.approx((120 + 48) * 1e-9)  # the second call priced by its bytes
    assert (training.flops, training.calls) == (360, 3)
    assert 0 < inference.forward_seconds < 1 and 0 < training.forward_seconds < 1  # two and one clocked calls
    layer(torch.zeros(5, 4))  # outside ``counting``: not counted
    rec.mark("after")
    assert rec.spans["after"].calls == 0


def test_a_run_is_counted_stage_by_stage(tmp_path, tiny_ckpt):
    """Every counted product lands in a span, and every span but the match's is a stage or a
    method whose time the run records (the match's two phases are split by the script)."""
    exp = write_tiny_experiment(tmp_path, tiny_ckpt, controls=["noop", "random_delta"],
                                methods=[{"name": "unembed_direction"}],
                                decision={"alphas": [2], "max_kl": 2e-3, "random_draws": 2})
    runner = Runner(Experiment.from_yaml(exp), build_plugin_manager(builtins=TINY_BUILTINS, entry_points=False),
                    tmp_path / "run", progress=False, log=lambda _msg: None)
    rec = floor.Recorder(ROOF)
    everything = floor.Recorder(ROOF)  # an independent count of the same calls, never split
    with everything.counting():
        timings = floor.count_run(runner, rec)
    everything.mark("all")
    assert sum(t.calls for t in rec.spans.values()) == everything.spans["all"].calls > 0
    assert sum(t.flops for t in rec.spans.values()) == pytest.approx(everything.spans["all"].flops)
    split = {"match:dose", "match:completions"}
    assert set(rec.spans) - split <= set(timings)
    for label in ("score", "completions", "match:dose", "match:completions"):
        assert rec.spans[label].flops > 0, label
    rows = floor.table(timings, rec)
    assert {r["stage"] for r in rows} == set(rec.spans)
    assert all(r["measured_over_floor"] > 0 for r in rows if r["measured_seconds"] and r["floor_seconds"])
