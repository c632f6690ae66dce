"""The staged runner: extract -> propose -> score -> completions -> match, into one run directory.

The stages are functions over one :class:`~steercmp.run.stage_context.StageContext`
(``run/stage_*.py``); the runner validates the experiment, builds that context and calls them in
order. One model is resident at a time (:class:`~steercmp.run.runtime.ResourceManager`): the base
model is loaded for extraction, released while methods load their own models (AV, AR, SAE), and
reloaded for scoring. Each stage's outputs are keyed by what determines them
(:mod:`steercmp.run.keys`), so a rerun reuses finished stages and units and ``--fresh`` ignores
them. The report is not a stage: it reads a finished run directory (:mod:`steercmp.report`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import polars as pl

from steercmp.config import Experiment
from steercmp.errors import ConfigError, SteercmpError
from steercmp.paths import sole_writer
from steercmp.plugin_manager import PluginSet
from steercmp.run.keys import STAGES, RunKeys
from steercmp.run.rundir import RunDir, ensure_writable_dir, write_json, write_text
from steercmp.run.runtime import ResourceManager, tqdm_progress
from steercmp.run.stage_completions import stage_completions
from steercmp.run.stage_context import Ledger, StageContext
from steercmp.run.stage_extract import stage_extract
from steercmp.run.stage_locate import LocatePlan, LocateScan, plan_locate, stage_locate
from steercmp.run.stage_match import stage_match
from steercmp.run.stage_propose import cell_book, stage_propose
from steercmp.run.stage_score import stage_score
from steercmp.run.sweep_settings import SweepSettings
from steercmp.run.validate import preflight, validate_experiment
from steercmp.score.sample import Sampling


class Runner:
    """Runs one experiment into one run directory. Built complete: a shard is a Runner on
    :meth:`~steercmp.config.Experiment.with_prompts`, nothing is patched afterwards."""

    def __init__(self, experiment: Experiment, plugins: PluginSet, run_dir: Path, *,
                 fresh: bool = False, progress: bool = True, log: Callable[[str], None] | None = None):
        self.experiment = experiment
        self.battery = experiment.battery
        self.rundir = RunDir(run_dir)
        self.run_dir = self.rundir.root
        self.fresh = fresh
        self.progress = tqdm_progress(progress)
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.resources = ResourceManager(experiment.model, progress, self.log)
        validated = validate_experiment(experiment, plugins)
        self.methods = validated.methods
        self.controls = validated.controls
        #: what the stages did (the manifest reads it); the attributes below are its parts
        self.ledger = Ledger()
        self.timings: dict[str, float] = self.ledger.timings
        self.reused: list[str] = self.ledger.reused
        self.reused_units: dict[str, dict[str, int]] = self.ledger.reused_units
        self.stage_keys: dict[str, str] = self.ledger.stage_keys
        self.failures: list[SteercmpError] = self.ledger.failures
        self._keys: RunKeys | None = None

    @property
    def keys(self) -> RunKeys:
        """The run's resume keys (reading the checkpoint's file hashes once)."""
        if self._keys is None:
            from steercmp.lm.load import resolve_source
            from steercmp.run.provenance import checkpoint_identity

            spec = self.experiment.model
            resolve_source(spec.id, progress=False)  # the embedded model's files exist before they are hashed
            ident = checkpoint_identity(spec.id, spec.revision)
            self._keys = RunKeys(self.experiment, self.methods, self.controls,
                                 {"id": spec.id, "revision": ident.get("revision"), "files": ident.get("files", {})})
        return self._keys

    def run(self, steps: Sequence[str] = STAGES) -> pl.DataFrame | None:
        """Run ``steps``; nothing is written before the battery passes the tokenizer checks."""
        ctx = self.stage_context() if any(s in steps for s in STAGES) else None
        if ctx is not None and not ctx.reusable("extract", ctx.keys.extract(), ctx.rundir.activations,
                                                ctx.rundir.contexts):
            ctx.tokens = preflight(self.experiment)  # each prompt tokenized once; extraction reads it
        ensure_writable_dir(self.run_dir)
        with sole_writer(self.run_dir, where=str(self.run_dir)):  # one writer per run directory
            write_text(self.rundir.config, self.experiment.snapshot())
            cells = self._stages(ctx, steps) if ctx is not None else None
            self.resources.release()
            self.write_manifest()
        return cells

    def locate(self, scan: LocateScan) -> tuple[LocatePlan, pl.DataFrame]:
        """``steercmp locate`` on this runner's machinery: the scan is checked (model loaded,
        counterfactuals built) before anything is written, then its layers run as units under
        the run directory's writer lock, and the manifest records them."""
        if self.rundir.cells.exists() or self.rundir.activations.exists():
            raise ConfigError(f"{str(self.run_dir)!r} holds a run of `steercmp run`; locate would overwrite its "
                              "manifest", where="--out", fix="choose another --out (the default is <name>-locate)")
        ensure_writable_dir(self.run_dir)  # before the model loads: a bad --out fails at once
        ctx = self.stage_context()
        ctx.tokens = preflight(self.experiment)
        plan = plan_locate(ctx, scan)  # every refusal comes before the first file is written
        with sole_writer(self.run_dir, where=str(self.run_dir)):
            write_text(self.rundir.config, self.experiment.snapshot())
            records = stage_locate(ctx, plan)
            self.resources.release()
            self.write_manifest()
        return plan, records

    def stage_context(self) -> StageContext:
        """What the stage functions read: the experiment's settings, not the experiment."""
        exp = self.experiment
        return StageContext(
            rundir=self.rundir, keys=self.keys, resources=self.resources, sweep=SweepSettings.of(exp),
            sampling=Sampling(exp.completions, exp.layer, exp.seed), battery=self.battery, model=exp.model,
            source=exp.source, single_token_families=exp.single_token_families, methods=self.methods,
            method_order=tuple(s.key for s in exp.methods), controls=self.controls, run_settings=exp.run_settings,
            completions=exp.completions, ledger=self.ledger, fresh=self.fresh, progress=self.progress, log=self.log)

    @staticmethod
    def _stages(ctx: StageContext, steps: Sequence[str]) -> pl.DataFrame | None:
        cells = None
        contexts = stage_extract(ctx, run="extract" in steps)
        if any(s in steps for s in ("propose", "score", "completions", "match")):
            proposals = stage_propose(ctx, contexts, run="propose" in steps)
            if "score" in steps or "completions" in steps:
                book = cell_book(ctx, contexts, proposals)
                if "score" in steps:
                    cells = stage_score(ctx, book)
                if "completions" in steps and ctx.completions.enabled:
                    stage_completions(ctx, book, contexts, cells)
            if "match" in steps:
                stage_match(ctx, contexts, proposals)
        return cells

    def prune_units(self) -> list[Path]:
        """Delete the unit files this experiment no longer references (a changed config, code or
        battery leaves old units behind); returns what was removed."""
        methods = [s.key for s in self.experiment.methods]
        wanted = {("score", u) for _, _, u in self.keys.units("score", methods)}
        wanted |= {("completions", u) for _, _, u in self.keys.units("completions", methods)}
        wanted |= {("completions", f"baseline-{self.keys.completion_baseline(p.id)}") for p in self.battery.prompts}
        removed = []
        for stage in ("score", "completions"):
            folder = self.rundir.unit(stage, "x").parent
            for path in sorted(folder.glob("*.parquet")) if folder.exists() else []:
                if (stage, path.stem) not in wanted:
                    path.unlink()
                    removed.append(path)
        self.log(f"[prune] removed {len(removed)} unit files no longer referenced")
        return removed

    def write_manifest(self) -> None:
        from steercmp.run.provenance import build_manifest

        write_json(self.rundir.manifest, build_manifest(self))
