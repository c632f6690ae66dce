"""The example third-party plugin (examples/steercmp-actadd) works end to end from its entry point.

Installs the example into the current environment (from a copy, so the checkout gets no build
folders), then: `steercmp plugins` lists it, it passes the conformance kit, and it runs in a
tiny experiment beside the built-ins (unembed_direction and the prompting baseline).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

import steercmp.testing
from steercmp.config import Experiment
from steercmp.plugin_manager import build_plugin_manager
from steercmp.run.runner import Runner

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "steercmp-actadd"
BUILTINS = ("steercmp_plugins.controls", "steercmp_plugins.unembed", "steercmp_plugins.prompting")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    src = tmp_path_factory.mktemp("example") / "steercmp-actadd"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                           "--no-build-isolation", "--no-input", str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    importlib.invalidate_caches()
    return importlib.metadata.distribution("steercmp-actadd")


def test_entry_point_declared(installed):
    eps = [ep for ep in installed.entry_points if ep.group == "steercmp"]
    assert [(ep.name, ep.value) for ep in eps] == [("actadd", "steercmp_actadd")]


def test_listed_by_steercmp_plugins(installed):
    exe = Path(sys.executable).parent / "steercmp"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "steercmp"]
    proc = subprocess.run([*cmd, "plugins"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "  actadd  (entry point, steercmp-actadd 0.1.0)" in proc.stdout
    methods = proc.stdout.split("methods:", 1)[1].split("controls:", 1)[0]
    line = next(ln for ln in methods.splitlines() if ln.strip().startswith("actadd "))
    assert "(entry point, steercmp-actadd 0.1.0)" in line and "activation addition" in line


def test_passes_conformance_kit(installed):
    ps = build_plugin_manager(builtins=(), entry_points=True)
    cls = ps.method("actadd")
    assert ps.methods["actadd"].origin == "entry point, steercmp-actadd 0.1.0"
    report = steercmp.testing.check_method(cls)
    assert report.checks[-1] == "engine"


def test_runs_beside_builtins(installed, tmp_path):
    battery = tmp_path / "battery.yaml"
    battery.write_text(yaml.safe_dump(steercmp.testing.TINY_BATTERY, sort_keys=False))
    model_dir = steercmp.testing.save_tiny_checkpoint(tmp_path / "model")
    exp = Experiment.from_dict({
        "name": "example", "seed": 0, "layer": 2, "battery": str(battery),
        "model": {"id": str(model_dir)}, "alphas": [0, 2], "scalings": ["raw", "norm_relative"],
        "decision": {"alphas": [2]}, "completions": {"enabled": False},
        "methods": [{"name": "actadd"}, {"name": "unembed_direction"}, {"name": "prompting"}],
        "controls": ["noop", "random_delta", "wrong_position"],
    }, source=str(tmp_path / "example.yaml"))
    plugins = build_plugin_manager(builtins=BUILTINS, entry_points=True)
    runner = Runner(exp, plugins, tmp_path / "run", progress=False, log=lambda msg: None)
    cells = runner.run(("extract", "propose", "score"))
    assert not runner.failures, [f.one_line() for f in runner.failures]
    assert cells is not None
    assert set(cells["method"].unique()) >= {"actadd", "unembed_direction", "prompting"}
    n_prompts = len(steercmp.testing.TINY_BATTERY["prompts"])
    dm = cells.filter(pl.col("method") == "actadd")
    # 5 conditions x 2 alphas x 2 scalings per prompt, all scored
    assert dm.height == n_prompts * 5 * 2 * 2
    assert dm["status"].unique().to_list() == ["ok"] and dm["score"].is_not_null().all()
    pr = cells.filter(pl.col("method") == "prompting")
    na = pr.filter(pl.col("condition").is_in(["random_delta", "wrong_position"]))
    assert na["status"].unique().to_list() == ["not_applicable"] and na["score"].is_null().all()
    target = pr.filter(pl.col("condition") == "target_edit")
    assert target["score"].is_not_null().all()
    assert all(json.loads(m)["alpha_applies"] is False for m in target["meta"])
    noop = pr.filter(pl.col("condition") == "noop")
    assert noop["score"].is_not_null().all() and (noop["delta_norm"] == 0).all()
