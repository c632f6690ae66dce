"""The ``steercmp`` command line: run, plan, report, plugins, bench, and plugin commands.

Errors a user can fix print one line (``steercmp: error: ...``) and exit 2; no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from steercmp.errors import SteercmpError


def _plugin_set(args: argparse.Namespace):
    from steercmp.plugin_manager import build_plugin_manager

    return build_plugin_manager(plugins_dir=getattr(args, "plugins_dir", None))


def _load_experiment(path: str | None):
    from steercmp.config import Experiment, default_experiment_path

    return Experiment.from_yaml(Path(path) if path else default_experiment_path())


def cmd_run(args: argparse.Namespace) -> int:
    from steercmp.runner import STAGES, Runner, format_table, summary_frame

    experiment = _load_experiment(args.experiment)
    plugins = _plugin_set(args)
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    out = Path(args.out) if args.out else Path("artifacts") / experiment.name
    steps = STAGES if args.step in (None, "all") else (args.step,)
    if args.processes > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _run_distributed(args, experiment, out, steps)
    runner = Runner(experiment, plugins, out, fresh=args.fresh, progress=not args.no_progress)
    cells = runner.run(steps)
    summary_path = out / "report" / "summary.parquet"
    if cells is not None or summary_path.exists():
        print(f"\nsteercmp {experiment.name}: {len(runner.battery)} prompts, layer {experiment.layer}, "
              f"model {experiment.model.id} (score = logmass(edited) - logmass(original))")
        if summary_path.exists():
            import polars as pl

            from steercmp.report import format_summary_table

            print(format_summary_table(pl.read_parquet(summary_path)))
        else:
            print(format_table(summary_frame(cells)))
    verdict = out / "report" / "verdict.json"
    if verdict.exists():
        import json

        print("\nverdicts (decision alphas " + ", ".join(f"{a:g}" for a in experiment.decision_alphas) + "):")
        for row in json.loads(verdict.read_text()).get("verdicts", []):
            print(f"  {row.get('method')} [{row.get('scaling')}]: {row.get('verdict')}")
    print(f"\nrun directory: {out}")
    if runner.failures:
        for failure in runner.failures:
            print(f"steercmp: error: {failure.one_line()}", file=sys.stderr)
        return 2
    return 0


def _run_distributed(args: argparse.Namespace, experiment, out: Path, steps) -> int:
    """Shard prompts over ``--processes`` local workers (or ranks of ``accelerate launch``)."""
    from steercmp.distributed import PluginSpec, run_rank, run_sharded
    from steercmp.runner import format_table, summary_frame

    plugins = PluginSpec(plugins_dir=args.plugins_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        run_rank(experiment, out, plugins=plugins, steps=steps, fresh=args.fresh)
        return 0
    cells, failures = run_sharded(experiment, out, args.processes, plugins=plugins, steps=steps,
                                  fresh=args.fresh)
    if cells is not None:
        print(format_table(summary_frame(cells)))
    print(f"\nrun directory: {out} ({args.processes} processes)")
    for failure in failures:
        print(f"steercmp: error: {failure}", file=sys.stderr)
    return 2 if failures else 0


def cmd_plan(args: argparse.Namespace) -> int:
    from steercmp.plan import describe_plan

    experiment = _load_experiment(args.experiment)
    print(describe_plan(experiment, _plugin_set(args)))
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    plugins = _plugin_set(args)
    print("plugins loaded:")
    for name, origin in plugins.sources:
        print(f"  {name}  ({origin})")
    print("methods:")
    for name, reg in sorted(plugins.methods.items()):
        print(f"  {name:<20} {reg.plugin} ({reg.origin})  {getattr(reg.cls, 'description', '')}")
    print("controls:")
    for name, reg in sorted(plugins.controls.items()):
        print(f"  {name:<20} {reg.plugin} ({reg.origin})  {getattr(reg.cls, 'description', '')}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from steercmp.report import write_report

    run_dir = Path(args.run_dir)
    if not (run_dir / "cells.parquet").exists():
        from steercmp.errors import ConfigError

        raise ConfigError("no cells.parquet in the run directory", where=str(run_dir),
                          fix="point at a run directory written by `steercmp run`")
    out = write_report(run_dir, decision_alphas=args.alphas, n_boot=args.n_boot)
    print(f"report written to {out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from steercmp.bench import main as bench_main

    return bench_main(args)


def build_parser(plugin_commands: Sequence[tuple] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steercmp", description=__doc__)
    parser.add_argument("--plugins-dir", help="also load plugins from *.py files in this directory")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run an experiment (default: the embedded Gemma 3 270M)")
    run.add_argument("experiment", nargs="?", help="experiment YAML (default experiments/embedded.yaml)")
    run.add_argument("--out", help="run directory (default artifacts/<experiment name>)")
    run.add_argument("--step", choices=("all", "extract", "propose", "score", "completions", "report"),
                     help="run one stage (earlier stages must exist in the run directory)")
    run.add_argument("--fresh", action="store_true", help="ignore finished stages in the run directory")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.add_argument("--processes", type=int, default=1,
                     help="shard prompts over N local processes (merged into one run directory)")
    run.set_defaults(func=cmd_run)

    plan = sub.add_parser("plan", help="validate a config; print stages, models and peak memory")
    plan.add_argument("experiment", nargs="?")
    plan.set_defaults(func=cmd_plan)

    plugins = sub.add_parser("plugins", help="list loaded plugins, methods and controls")
    plugins.set_defaults(func=cmd_plugins)

    report = sub.add_parser("report", help="write the statistics and Altair report for a run directory")
    report.add_argument("run_dir")
    report.add_argument("--alphas", type=float, nargs="+", help="pre-declared decision alphas")
    report.add_argument("--n-boot", type=int, default=10_000)
    report.set_defaults(func=cmd_report)

    bench = sub.add_parser("bench", help="benchmark steercmp's sweep against the usual loops")
    from steercmp.bench import add_arguments

    add_arguments(bench)
    bench.set_defaults(func=cmd_bench)

    for name, help_text, configure, handler in plugin_commands:
        p = sub.add_parser(name, help=help_text)
        configure(p)
        p.set_defaults(func=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("WANDB_MODE", "disabled")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        plugin_dir = None
        if "--plugins-dir" in argv:
            i = argv.index("--plugins-dir")
            plugin_dir = argv[i + 1] if i + 1 < len(argv) else None
        from steercmp.plugin_manager import build_plugin_manager

        commands = build_plugin_manager(plugins_dir=plugin_dir).commands()
        parser = build_parser(commands)
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except SteercmpError as exc:
        print(f"steercmp: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("steercmp: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
