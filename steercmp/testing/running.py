"""Run a whole experiment quietly in a test: the real runner, an explicit plugin set."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl

from steercmp.config import Experiment
from steercmp.plugin_manager import build_plugin_manager
from steercmp.run.keys import STAGES
from steercmp.run.runner import Runner

#: the built-in plugins a tiny whole-run test needs (no NLA or SAE models)
TINY_BUILTINS = ("steercmp_plugins.controls", "steercmp_plugins.unembed")


def run_experiment(experiment: str | Path, out: str | Path, *, steps: Sequence[str] = STAGES,
                   builtins: Sequence[str] = TINY_BUILTINS, extra: Sequence[Any] = (),
                   **runner_kwargs: Any) -> tuple[Runner, pl.DataFrame | None]:
    """Run ``steps`` of the experiment YAML into ``out`` without progress bars or logs; returns
    the runner (its ``failures``, ``reused``...) and the scored cells. Entry-point plugins are
    not loaded: the plugin set is exactly ``builtins`` plus ``extra`` plugin objects."""
    plugins = build_plugin_manager(builtins=builtins, entry_points=False, extra=extra)
    runner_kwargs.setdefault("progress", False)
    runner_kwargs.setdefault("log", lambda _msg: None)
    runner = Runner(Experiment.from_yaml(experiment), plugins, Path(out), **runner_kwargs)
    return runner, runner.run(steps)
