"""``steercmp run``: run an experiment's stages, then write its report and print the verdicts."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl

from steercmp.config import Experiment
from steercmp.errors import ConfigError
from steercmp.plugin_manager import PluginSet
from steercmp.report import write_report
from steercmp.run.keys import STAGES
from steercmp.run.rundir import RunDir, ensure_writable_dir, write_json
from steercmp.run.runner import Runner
from steercmp.stats import format_summary_table, summarize

STEPS = ("all", *STAGES, "report")
#: stages the first (partial) report leaves to the full run
DEFERRED = ("completions",)


def run_command(args: argparse.Namespace, experiment: Experiment, plugins: PluginSet) -> int:
    """Run ``args.step`` (default all stages, then the report) into ``args.out``."""
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    n_prompts, size = len(experiment.battery), experiment.completions.prompt_group
    n_groups = -(-n_prompts // size)
    if args.processes < 1 or args.processes > n_groups:
        raise ConfigError(f"--processes {args.processes} must lie between 1 and {n_groups}, the sampling groups of "
                          f"the battery's {n_prompts} prompts (completions.prompt_group {size})", where="--processes",
                          fix=f"use 1..{n_groups} (each process scores a block of groups), or a smaller "
                              "completions.prompt_group (1: a process per prompt)")
    out = Path(args.out) if args.out else Path("artifacts") / experiment.name
    steps = STEPS[1:] if args.step in (None, "all") else (args.step,)
    stages = [s for s in steps if s in STAGES]
    failures: list[str] = []
    if args.processes > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        main_process, failures = _run_distributed(args, experiment, out, stages)
        if not main_process:
            return 0
    elif stages:
        t0 = time.perf_counter()
        runner = Runner(experiment, plugins, out, fresh=args.fresh, progress=not args.no_progress)
        full_run = tuple(steps) == STEPS[1:]
        pending = {k: why for k, m in runner.methods.items() if full_run and (why := m.pending_build())}
        if pending:
            if args.fresh:  # one fresh computation of everything, shared by both passes
                RunDir(out).forget_results()
                runner.fresh = False
            failures, first_timings, first_memory = _first_report(args, experiment, plugins, out, pending)
            runner.timings.update({f"first_report:{k}": v for k, v in first_timings.items()})
            runner.timings["first_report"] = time.perf_counter() - t0
            runner.resources.memory[:0] = [{**e, "pass": "first_report"} for e in first_memory]
        runner.run(stages)
        RunDir(out).pending.unlink(missing_ok=True)
        failures += [f.one_line() for f in runner.failures if f.one_line() not in failures]
        if getattr(args, "prune", False):
            runner.prune_units()
    run = RunDir(out)
    if "report" in steps and run.cells.exists():
        _report(experiment, plugins, out)
    _print_results(experiment, run)
    for failure in failures:
        print(f"steercmp: error: {failure}", file=sys.stderr)
    return 2 if failures else 0


def _report(experiment: Experiment, plugins: PluginSet, out: Path) -> None:
    write_report(out, decision_alphas=list(experiment.decision_alphas), seed=experiment.seed,
                 plugins=plugins, level=experiment.decision_level, correction=experiment.decision_correction)


def _first_report(args: argparse.Namespace, experiment: Experiment, plugins: PluginSet, out: Path,
                  pending: dict[str, str]) -> tuple[list[str], dict[str, float], list[dict[str, Any]]]:
    """Run the methods with nothing to build through every stage the verdict needs and write
    their report, marked partial (``pending.json``), before any build starts; the full run then
    reuses every unit of theirs and rewrites the report. The alpha sweep's sampled completions
    of the methods that inject (:data:`DEFERRED`: descriptive, no matched verdict reads them; their
    matched completions are sampled in the match stage) wait for the full run, so the first answer
    comes sooner. A prompting method's are sampled first: a prompt has no dose, so the match stage
    reads its completions as sampled. Returns the first pass's one-line failures, timings and
    memory readings (the manifest keeps them, marked ``pass: first_report``)."""
    ready = [s.key for s in experiment.methods if s.key not in pending]
    print(f"steercmp: first report without {', '.join(pending)} (still to build: "
          f"{'; '.join(sorted(set(pending.values())))})", file=sys.stderr)
    run = RunDir(out)
    ensure_writable_dir(run.root)
    deferred = [s for s in DEFERRED if s in STAGES and experiment.completions.enabled]
    write_json(run.pending, {"pending": pending, "ready": ready, "deferred": deferred})
    if not ready:
        return [], {}, []
    first = Runner(experiment.with_methods(ready), plugins, out, progress=not args.no_progress)
    if not deferred:
        first.run(STAGES)
        return _first_pass_report(experiment, plugins, run, first)
    first.run([s for s in STAGES if s not in ("completions", "match")])
    # the later passes read the proposals back, so they take only the methods that have them
    done = {*first.reused, *first.timings}  # "propose:<key>" of every method proposed or reused
    have = [k for k in ready if f"propose:{k}" in done]
    prompting = [k for k in have if first.methods[k].intervention != "activation"]
    for keys, stage in ((prompting, "completions"), (have, "match")):  # prompting texts: the match stage reads them
        if keys:
            later = Runner(experiment.with_methods(keys), plugins, out, progress=not args.no_progress)
            later.run([stage])
            first.failures.extend(later.failures)
            first.timings.update({k: v for k, v in later.timings.items() if k == stage or k.startswith(f"{stage}:")})
            first.resources.memory.extend(later.resources.memory)
    return _first_pass_report(experiment, plugins, run, first)


def _first_pass_report(experiment: Experiment, plugins: PluginSet, run: RunDir,
                       first: Runner) -> tuple[list[str], dict[str, float], list[dict[str, Any]]]:
    if run.cells.exists():
        _report(experiment, plugins, run.root)
        _print_results(experiment, run)
        print(f"steercmp: partial report written ({run.report / 'summary.md'}); building the rest now",
              file=sys.stderr)
    return [f.one_line() for f in first.failures], dict(first.timings), list(first.resources.memory)


def _run_distributed(args: argparse.Namespace, experiment: Experiment, out: Path,
                     stages: list[str]) -> tuple[bool, list[str]]:
    """Shard prompts over ``--processes`` local workers (or ranks of ``accelerate launch``)."""
    from steercmp.run.distributed import PluginSpec, run_rank, run_sharded

    plugins = PluginSpec(plugins_dir=args.plugins_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _cells, main_process = run_rank(experiment, out, plugins=plugins, steps=stages, fresh=args.fresh)
        return main_process, []
    _cells, failures = run_sharded(experiment, out, args.processes, plugins=plugins, steps=stages,
                                   fresh=args.fresh)
    print(f"run directory: {out} ({args.processes} processes)", file=sys.stderr)
    return True, failures


def _print_results(experiment: Experiment, run: RunDir) -> None:
    """The matched-dose verdict table (the per-alpha summary only for a run without one: it is
    hundreds of lines, and details.md holds it)."""
    summary_path = run.report / "summary.parquet"
    verdict = run.report / "verdict.json"
    if summary_path.exists() or run.cells.exists():
        print(f"\nsteercmp {experiment.name}: {len(experiment.battery)} prompts, layer {experiment.layer}, "
              f"model {experiment.model.id} (score = logmass(edited) - logmass(original))")
    if not run.matched.exists() and (summary_path.exists() or run.cells.exists()):
        summary = pl.read_parquet(summary_path) if summary_path.exists() else \
            summarize(pl.read_parquet(run.cells), n_boot=1_000, seed=experiment.seed)
        print(format_summary_table(summary))
    if verdict.exists():
        data = json.loads(verdict.read_text())
        if "partial" in data:
            print(f"\n{data['partial']['notice']}")
        if "alpha_sweep" in data:  # the matched-dose verdict
            from steercmp.report.summary_page import verdict_table

            head, rows = verdict_table(data["verdicts"])
            keep = [0, 2, 3, 5, 7, 8]
            widths = [max(len(head[i]), *(len(r[i]) for r in rows)) if rows else len(head[i]) for i in keep]
            print(f"\n{data.get('site', '')}\nverdicts at matched side effects:")
            for r in [head, *rows]:
                print("  " + "  ".join(r[i].ljust(w) for i, w in zip(keep, widths, strict=True)))
        else:
            print("\nverdicts (decision alphas " + ", ".join(f"{a:g}" for a in experiment.decision_alphas) + "):")
            for row in data.get("verdicts", []):
                print(f"  {row.get('method')} [{row.get('scaling')}]: {row.get('verdict')}")
    print(f"\nrun directory: {run.root}")
