"""``steercmp report RUN_DIR``: statistics, verdicts and the Altair report of any run directory."""

from __future__ import annotations

import argparse

from steercmp.errors import ConfigError
from steercmp.plugin_manager import PluginSet
from steercmp.report import write_report
from steercmp.run.rundir import CELLS, RunDir


def report_command(args: argparse.Namespace, plugins: PluginSet) -> int:
    run = RunDir(args.run_dir)
    if not run.cells.exists():
        raise ConfigError(f"no {CELLS} in the run directory", where=str(run.root),
                          fix="point at a run directory written by `steercmp run`")
    out = write_report(run.root, decision_alphas=args.alphas, n_boot=args.n_boot, plugins=plugins,
                       level=args.level, correction=args.correction)
    print(f"report written to {out}")
    return 0
