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
    from steercmp.battery_files import default_experiment_path
    from steercmp.config import Experiment

    return Experiment.from_yaml(Path(path) if path else default_experiment_path())


def cmd_run(args: argparse.Namespace) -> int:
    from steercmp.commands.run import run_command

    return run_command(args, _load_experiment(args.experiment), _plugin_set(args))


def cmd_plan(args: argparse.Namespace) -> int:
    from steercmp.commands.plan import describe_plan

    experiment = _load_experiment(args.experiment)
    print(describe_plan(experiment, _plugin_set(args)))
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from steercmp.commands.plugins import plugins_command

    return plugins_command(_plugin_set(args))


def cmd_report(args: argparse.Namespace) -> int:
    from steercmp.commands.report import report_command

    return report_command(args, _plugin_set(args))


def cmd_locate(args: argparse.Namespace) -> int:
    from steercmp.commands.locate import locate_command

    return locate_command(args, _load_experiment(args.experiment), _plugin_set(args))


def cmd_bench(args: argparse.Namespace) -> int:
    from steercmp.commands.bench import main as bench_main

    return bench_main(args)


def build_parser(plugin_commands: Sequence[tuple] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steercmp", description=__doc__)
    parser.add_argument("--plugins-dir", help="also load plugins from *.py files in this directory")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run an experiment (default: the embedded Gemma 3 270M)")
    run.add_argument("experiment", nargs="?", help="experiment YAML (default experiments/embedded.yaml)")
    run.add_argument("--out", help="run directory (default artifacts/<experiment name>)")
    run.add_argument("--step", choices=("all", "extract", "propose", "score", "completions", "match", "report"),
                     help="run one stage (earlier stages must exist in the run directory); "
                          "report re-reads the run directory")
    run.add_argument("--fresh", action="store_true", help="ignore finished stages in the run directory")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.add_argument("--prune", action="store_true",
                     help="afterwards, delete unit files the experiment no longer references")
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
    report.add_argument("--level", type=float, help="significance level (default: config's decision.level, 0.05)")
    report.add_argument("--correction", help="correction across methods: none or holm (default: the config's)")
    report.set_defaults(func=cmd_report)

    locate = sub.add_parser("locate", help="causal site scan: where patching a counterfactual moves the rhyme")
    from steercmp.commands.locate import configure as configure_locate

    configure_locate(locate)
    locate.set_defaults(func=cmd_locate)

    bench = sub.add_parser("bench", help="benchmark steercmp's sweep against the usual loops")
    from steercmp.commands.bench import add_arguments

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
    if "--no-progress" in argv and "tqdm" not in sys.modules:
        os.environ.setdefault("TQDM_DISABLE", "1")  # every bar, builders' and libraries' too (read at import)
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
