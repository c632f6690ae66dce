"""The staged runner: extract -> propose -> score -> completions, into one run directory.

One model is resident at a time (:class:`~steercmp.run.runtime.ResourceManager`): the base model
is loaded for extraction, released while methods load their own models (AV, AR, SAE), and
reloaded for scoring. Each stage's outputs are keyed by what determines them
(:mod:`steercmp.run.keys`), so a rerun reuses finished stages and units and ``--fresh`` ignores
them. The report is not a stage: it reads a finished run directory (:mod:`steercmp.report`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import polars as pl
import torch

from steercmp.api import PROPOSAL_FAMILIES, PromptContext, Proposal
from steercmp.config import Experiment
from steercmp.errors import ConfigError, NumericalError, PluginError, SteercmpError
from steercmp.lm.capture import extract
from steercmp.lm.prompts import TokenizedPrompt, tokenize_battery
from steercmp.paths import sole_writer
from steercmp.plugin_manager import PluginSet
from steercmp.run.cells import CELL_SCHEMA, Cell, CellBook, FamilyForms, method_cells, score_unit
from steercmp.run.keys import STAGES, RunKeys
from steercmp.run.proposals import ProposalContract, check_proposals, load_proposals, save_proposals
from steercmp.run.rundir import (
    RunDir,
    ensure_writable_dir,
    read_json,
    read_tensors,
    write_json,
    write_parquet,
    write_tensors,
    write_text,
)
from steercmp.run.runtime import ResourceManager, RunnerRuntime, tqdm_progress
from steercmp.run.sweep_settings import SweepSettings
from steercmp.run.validate import preflight, validate_experiment
from steercmp.schemas import (
    BASELINE_SCHEMA,
    BASELINE_UNIT,
    CELLS,
    COMPLETION_UNIT,
    MATCHED_SCHEMA,
    MATCHED_UNIT,
    SCORE_UNIT,
    read_table,
)
from steercmp.score.sample import COMPLETION_SCHEMA, Sampling, sample_baseline, sample_completions

Unit = tuple[str, str, str]  # (method key, prompt id, unit key)


def by_prompt(units: Sequence[Unit]) -> list[tuple[str, list[tuple[str, str]]]]:
    """``[(prompt id, [(method, unit key), ...]), ...]`` in first-seen order: the pending units of
    each prompt, computed together (one batch) and written apart."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for method, pid, ukey in units:
        groups.setdefault(pid, []).append((method, ukey))
    return list(groups.items())
#: how to repair a stored result that fails its schema check (docs/schemas.md): compute it again
RECOMPUTE = "delete the file or rerun with --fresh so it is computed again"


class Runner:
    """Runs one experiment into one run directory. Built complete: a shard is a Runner on
    :meth:`~steercmp.config.Experiment.with_prompts`, nothing is patched afterwards."""

    def __init__(self, experiment: Experiment, plugins: PluginSet, run_dir: Path, *,
                 fresh: bool = False, progress: bool = True, log: Callable[[str], None] | None = None):
        self.experiment = experiment
        self.battery = experiment.battery
        #: what sampling needs: the completion settings, layer and seed; each prompt's families
        self.sampling = Sampling(experiment.completions, experiment.layer, experiment.seed)
        self.families = {p.id: p.families for p in experiment.battery.prompts}
        self.rundir = RunDir(run_dir)
        self.run_dir = self.rundir.root
        self.fresh = fresh
        self.progress = tqdm_progress(progress)
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        #: what the score and match stages read of the experiment
        self.sweep = SweepSettings.of(experiment)
        self.resources = ResourceManager(experiment.model, progress, self.log)
        validated = validate_experiment(experiment, plugins)
        self.methods = validated.methods
        self.controls = validated.controls
        self.timings: dict[str, float] = {}
        self.reused: list[str] = []
        self.reused_units: dict[str, dict[str, int]] = {}
        self.stage_keys: dict[str, str] = {}
        self.failures: list[SteercmpError] = []
        self._keys: RunKeys | None = None
        #: each prompt tokenized once, by the preflight; extraction reads it
        self._tokens: dict[str, TokenizedPrompt] | None = None

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

    # ---------------------------------------------------------------- stages
    def run(self, steps: Sequence[str] = STAGES) -> pl.DataFrame | None:
        """Run ``steps``; nothing is written before the battery passes the tokenizer checks."""
        if any(s in steps for s in STAGES) and not self._reusable(
                "extract", self.keys.extract(), self.rundir.activations, self.rundir.contexts):
            self._tokens = preflight(self.experiment)
        ensure_writable_dir(self.run_dir)
        with sole_writer(self.run_dir, where=str(self.run_dir)):  # one writer per run directory
            write_text(self.rundir.config, self.experiment.snapshot())
            cells = self._stages(steps)
            self.resources.release()
            self.write_manifest()
        return cells

    def _stages(self, steps: Sequence[str]) -> pl.DataFrame | None:
        cells = None
        if not any(s in steps for s in STAGES):
            return cells
        contexts = self.stage_extract(run="extract" in steps)
        if any(s in steps for s in ("propose", "score", "completions", "match")):
            proposals = self.stage_propose(contexts, run="propose" in steps)
            if "score" in steps or "completions" in steps:
                book = self._cell_book(contexts, proposals)
                if "score" in steps:
                    cells = self.stage_score(book)
                if "completions" in steps and self.experiment.completions.enabled:
                    self.stage_completions(book, contexts, cells)
            if "match" in steps:
                self.stage_match(contexts, proposals)
        return cells

    def _reusable(self, stage: str, key: str, *paths: Path) -> bool:
        return (not self.fresh and self.rundir.stage_keys().get(stage) == key
                and all(p.exists() for p in paths))

    def _mark_done(self, stage: str, key: str) -> None:
        self.rundir.mark_done(stage, key)
        self.stage_keys[stage] = key

    def stage_extract(self, run: bool = True) -> list[PromptContext]:
        exp = self.experiment
        key = self.keys.extract()
        paths = (self.rundir.activations, self.rundir.contexts)
        if self._reusable("extract", key, *paths) or (not run and paths[0].exists()):
            self.reused.append("extract")
            return self._load_contexts()
        if not run:
            raise ConfigError("no extracted activations in this run directory", where=str(self.run_dir),
                              fix="run `--step extract` first (or `--step all`)")
        t = time.perf_counter()
        self.log(f"[extract] {exp.model.id} layer {exp.layer}, {len(self.battery)} prompts")
        lm = self.resources.base()
        if not 0 <= exp.layer < lm.num_layers:
            raise ConfigError(f"layer {exp.layer} is out of range for {exp.model.id} ({lm.num_layers} blocks)",
                              where=f"{exp.source}: layer", fix=f"use 0..{lm.num_layers - 1}")
        if self._tokens is None:  # a stage called without run(): no preflight yet
            self._tokens = tokenize_battery(self.battery, lm.tokenizer, chat_template=exp.model.chat_template,
                                            require_single_token=exp.single_token_families)
        contexts = extract(lm, exp.layer, self.battery.prompts, chat_template=exp.model.chat_template,
                           progress=self.progress, tokens=self._tokens)
        for c in contexts:
            if not torch.isfinite(c.resid).all():
                raise NumericalError(
                    f"the base model produced NaN or inf activations at layer {exp.layer} for prompt "
                    f"{c.prompt.id!r}", where=f"{exp.source}: model.id",
                    fix="check the checkpoint's weights, or use float32 instead of float16")
        write_tensors(self.rundir.activations, {c.prompt.id: c.resid for c in contexts},
                      {"layer": str(exp.layer), "model": exp.model.id})
        write_json(self.rundir.contexts, {c.prompt.id: {"input_ids": list(c.input_ids), "inject_pos": c.inject_pos,
                                                     "score_pos": c.score_pos} for c in contexts})
        self._mark_done("extract", key)
        self.resources.note("extract")
        self.timings["extract"] = time.perf_counter() - t
        return contexts

    def _load_contexts(self) -> list[PromptContext]:
        tensors = read_tensors(self.rundir.activations)
        meta = read_json(self.rundir.contexts)
        return [PromptContext(prompt=p, input_ids=tuple(meta[p.id]["input_ids"]),
                              inject_pos=meta[p.id]["inject_pos"], score_pos=meta[p.id]["score_pos"],
                              layer=self.experiment.layer, resid=tensors[p.id])
                for p in self.battery.prompts]

    def stage_propose(self, contexts: list[PromptContext], run: bool = True) -> dict[str, list[Proposal]]:
        t = time.perf_counter()
        out: dict[str, list[Proposal]] = {}
        for spec in self.experiment.methods:
            method = self.methods[spec.key]
            key = self.keys.propose(spec.key)
            tpath, jpath = self.rundir.proposal_tensors(spec.key), self.rundir.proposal_records(spec.key)
            if self._reusable(f"propose:{spec.key}", key, tpath, jpath) or (not run and jpath.exists()):
                self.reused.append(f"propose:{spec.key}")
                out[spec.key] = load_proposals(self.rundir, spec.key)
                continue
            if not run:
                raise ConfigError(f"no proposals for method {spec.key!r} in this run directory",
                                  where=str(self.run_dir), fix="run `--step propose` first")
            self.log(f"[propose] {spec.key}")
            t_method = time.perf_counter()
            runtime = RunnerRuntime(self.resources, self.rundir, self.experiment.run_settings(spec.key),
                                    progress=self.progress, fresh=self.fresh)
            try:
                contract = ProposalContract(scalings=self.sweep.scalings, intervention=method.intervention,
                                            families=(*PROPOSAL_FAMILIES, *method.companion_families))
                proposals = check_proposals(spec.key, method.propose(contexts, runtime), contexts, contract)
            except Exception as exc:
                # one failing method must not cost the others' results: record it and go on
                self._fail(spec.key, "proposing", exc)
                continue
            save_proposals(self.rundir, spec.key, proposals)
            self._mark_done(f"propose:{spec.key}", key)
            out[spec.key] = proposals
            self.timings[f"propose:{spec.key}"] = time.perf_counter() - t_method
            self.log(f"  {spec.key} proposed in {self.timings[f'propose:{spec.key}']:.1f} s")
        self.timings["propose"] = time.perf_counter() - t
        return out

    def _cell_book(self, contexts: list[PromptContext], proposals: dict[str, list[Proposal]]) -> CellBook:
        def build(key: str, forms: dict[str, FamilyForms]) -> list:  # type: ignore[type-arg]
            return method_cells(self.sweep, key, self.methods[key], self.controls, contexts, proposals[key],
                                self.resources.base().tokenizer, forms)

        keys = [s.key for s in self.experiment.methods if s.key in proposals]
        return CellBook(keys, build, lambda key, exc: self._fail(key, "building its cells", exc))

    def _fail(self, method: str, doing: str, exc: BaseException) -> None:
        """Record one method's failure (its name in the message) and carry on with the others."""
        if isinstance(exc, SteercmpError):
            where = exc.where or f"{self.experiment.source}: methods.{method}"
            message = exc.message if method in exc.message else f"method {method!r}: {exc.message}"
            cls = type(exc) if type(exc) in (ConfigError, NumericalError, PluginError) else PluginError
            err: SteercmpError = cls(message, where=where, fix=exc.fix)
        else:
            err = PluginError(f"method {method!r} raised while {doing}: {type(exc).__name__}: {exc}",
                              where=f"{self.experiment.source}: methods.{method}",
                              fix="see the method's documentation or report a bug to its author")
        self.failures.append(err)
        self.log(f"[{doing}] {method} FAILED: {err.one_line()}")

    # ---------------------------------------------------------------- units
    def _pending(self, stage: str, units: list[Unit], key: str, book: CellBook) -> tuple[list[Unit], list[Unit], str]:
        """Split a stage's units into all and still-to-compute, and log it. Building cells may drop
        a failing method; its units then leave the stage (and its key)."""
        todo = [u for u in units if self.fresh or not self.rundir.unit(stage, u[2]).exists()]
        if todo:
            book.build()
            units = [u for u in units if u[0] in book.methods]
            todo = [u for u in todo if u[0] in book.methods]
            key = self.keys.units_stage(stage, units)
        self.reused_units[stage] = {"reused": len(units) - len(todo), "computed": len(todo)}
        self.log(f"[{stage}] {len(units)} units (method x prompt): {len(units) - len(todo)} reused, "
                 f"{len(todo)} to compute")
        return units, todo, key

    def stage_score(self, book: CellBook) -> pl.DataFrame:
        """Score every cell, one (method, prompt) unit at a time; finished units are reused."""
        units = self.keys.units("score", book.methods)
        key = self.keys.units_stage("score", units)
        if self._reusable("score", key, self.rundir.cells):
            self.reused.append("score")
            df = read_table(self.rundir.cells, CELLS, require_target=False, fix=RECOMPUTE)
            self._report_error_cells(df)
            return df
        t = time.perf_counter()
        units, todo, key = self._pending("score", units, key, book)
        # one batch per prompt over all its pending methods: the prompt's prefix is computed once and
        # its unsteered rows score once; each (method, prompt) unit is still written on its own
        for pid, group in self.progress(by_prompt(todo), "score prompts", len({u[1] for u in todo})):
            records = score_unit(self.resources.base(), self.experiment.layer,
                                 [c for method, _ in group for c in book.cells(method, pid)], self.experiment.batch_size)
            for method, ukey in group:
                write_parquet(self.rundir.unit("score", ukey),
                              pl.DataFrame([r for r in records if r["method"] == method], schema=CELL_SCHEMA))
        frames = [read_table(self.rundir.unit("score", u), SCORE_UNIT, fix=RECOMPUTE) for _, _, u in units]
        df = pl.concat(frames, how="vertical") if frames else pl.DataFrame(schema=CELL_SCHEMA)
        write_parquet(self.rundir.cells, df)
        self._mark_done("score", key)
        if todo:
            self.resources.note("score")
        self.timings["score"] = time.perf_counter() - t
        self._report_error_cells(df)
        return df

    def _report_error_cells(self, df: pl.DataFrame) -> None:
        """NaN/inf logits never become numbers: the cells say ``error`` and the run exits 2."""
        bad = df.filter(pl.col("status") == "error")
        for method in bad["method"].unique(maintain_order=True).to_list():
            rows = bad.filter(pl.col("method") == method)
            r = rows.row(0, named=True)
            self.failures.append(NumericalError(
                f"method {method!r}: {rows.height} cells have NaN or inf logits (first: prompt "
                f"{r['prompt_id']!r}, {r['condition']}, alpha {r['alpha']:g}, {r['scaling']}); they are "
                "kept with status=error and no score",
                where=f"{self.experiment.source}: methods.{method}",
                fix="lower the alphas or the method's delta norm, or use float32"))

    def _baselines(self, contexts: list[PromptContext]) -> dict[tuple[tuple[int, ...], int], str]:
        """Every prompt's unsteered completions (one unit per prompt, shared by all methods)."""
        out: dict[tuple[tuple[int, ...], int], str] = {}
        for ctx in contexts:
            path = self.rundir.unit("completions", f"baseline-{self.keys.completion_baseline(ctx.prompt.id)}")
            context = tuple(ctx.input_ids[: ctx.score_pos + 1])
            if self.fresh or not path.exists():
                texts = sample_baseline(self.resources.base(), self.sampling, ctx.prompt.id, context)
                write_parquet(path, pl.DataFrame({"prompt_id": [ctx.prompt.id] * len(texts),
                                                  "seed": list(range(len(texts))), "text": texts},
                                                 schema=BASELINE_SCHEMA))
            for r in read_table(path, BASELINE_UNIT, fix=RECOMPUTE).iter_rows(named=True):
                out[(context, r["seed"])] = r["text"]
        return out

    def stage_completions(self, book: CellBook, contexts: list[PromptContext],
                          scored: pl.DataFrame | None = None) -> None:
        """Sample completions one (method, prompt) unit at a time; finished units are reused."""
        exp = self.experiment
        units = self.keys.units("completions", book.methods)
        key = self.keys.units_stage("completions", units)
        if self._reusable("completions", key, self.rundir.completions):
            self.reused.append("completions")
            return
        t = time.perf_counter()
        if scored is None and self.rundir.cells.exists():
            scored = read_table(self.rundir.cells, CELLS, require_target=False, fix=RECOMPUTE)
        errors: set[Any] = set()
        if scored is not None:
            errors = set(scored.filter(pl.col("status") == "error")
                         .select("prompt_id", "method", "condition", "alpha", "scaling").iter_rows())
        units, todo, key = self._pending("completions", units, key, book)
        baseline = self._baselines([c for c in contexts if any(u[1] == c.prompt.id for u in todo)]) if todo else {}
        failed: set[str] = set()

        def chosen(method: str, pid: str) -> list[Cell]:
            out = []
            for c in book.cells(method, pid):
                if c.alpha not in exp.completions.alphas:
                    continue
                if (c.prompt_id, c.method, c.condition, c.alpha, c.scaling) in errors:
                    c = attrs.evolve(c, row=None, status="error")
                out.append(c)
            return out

        # one sampling batch per prompt over all its pending methods (each row keeps its own
        # generator, so a row's text does not depend on its batch); a failure retries method by
        # method so only the method at fault is dropped
        for pid, group in self.progress(by_prompt(todo), "completion prompts", len({u[1] for u in todo})):
            group = [(m, k) for m, k in group if m not in failed]
            try:
                frames = {None: sample_completions(self.resources.base(), self.sampling,
                                                   [c for m, _ in group for c in chosen(m, pid)], self.families,
                                                   baseline=baseline)}
            except Exception:
                frames = {}
                for method, _ in group:
                    try:
                        frames[method] = sample_completions(self.resources.base(), self.sampling,
                                                            chosen(method, pid), self.families, baseline=baseline)
                    except Exception as exc:
                        self._fail(method, "sampling completions", exc)
                        failed.add(method)
            for method, ukey in group:
                if method in failed:
                    continue
                df = frames[method] if method in frames else frames[None].filter(pl.col("method") == method)
                write_parquet(self.rundir.unit("completions", ukey), df)
        frames = [read_table(self.rundir.unit("completions", u), COMPLETION_UNIT, fix=RECOMPUTE)
                  for m, _, u in units if m not in failed]
        df = pl.concat(frames, how="vertical") if frames else pl.DataFrame(schema=COMPLETION_SCHEMA)
        df = df.sort("method", "condition", "scaling", "alpha", "prompt_id", "seed", nulls_last=True)
        write_parquet(self.rundir.completions, df)
        if not failed:
            self._mark_done("completions", key)
        if todo:
            self.resources.note("completions")
        self.timings["completions"] = time.perf_counter() - t

    def stage_match(self, contexts: list[PromptContext], proposals: dict[str, list[Proposal]]) -> None:
        """Every method and control at the prompt's side-effect budget (:mod:`steercmp.run.match`),
        and completions at those doses; one resumable unit per (prompt, part): a method's own
        rows, or the shared controls'."""
        from steercmp.run.match import (
            SHARED,
            Contenders,
            expand_shared,
            match_prompt,
            matched_completions,
            positive_control,
            prompt_method_completions,
            prompt_method_rows,
        )

        exp = self.experiment
        keys = [s.key for s in exp.methods if s.key in proposals]
        methods = {k: self.methods[k] for k in keys}
        pc = positive_control(methods, proposals)
        field = Contenders(methods, self.controls, pc)
        parts = [*keys, SHARED]
        units = [(ctx, part, self.keys.match_unit(ctx.prompt.id, part, pc)) for ctx in contexts for part in parts]
        key = self.keys.stage("match", [u for _, _, u in units])
        if self._reusable("match", key, self.rundir.matched):
            self.reused.append("match")
            return
        t = time.perf_counter()
        todo = [u for u in units if self.fresh or not self.rundir.unit("match", u[2]).exists()]
        self.reused_units["match"] = {"reused": len(units) - len(todo), "computed": len(todo)}
        self.log(f"[match] {len(units)} units (prompt x method, and shared controls): {len(units) - len(todo)} "
                 f"reused, {len(todo)} to dose-match")
        cells = read_table(self.rundir.cells, CELLS, require_target=False, fix=RECOMPUTE) \
            if self.rundir.cells.exists() else None
        by_key = {k: {} for k in keys}  # type: dict[str, dict[str, dict[str, Proposal]]]
        for k in keys:
            for p in proposals[k]:
                by_key[k].setdefault(p.prompt_id, {})[p.family] = p
        baseline = self._baselines(list({id(c): c for c, _, _ in todo}.values())) \
            if todo and exp.completions.enabled else {}
        prompt_completions = prompt_method_completions(self.rundir, methods)
        spent = {"match:dose": 0.0, "match:completions": 0.0}
        pending: dict[str, tuple[PromptContext, list[tuple[str, str]]]] = {}
        for ctx, part, ukey in todo:  # a prompt's pending parts are matched and sampled together
            pending.setdefault(ctx.prompt.id, (ctx, []))[1].append((part, ukey))
        for pid, (ctx, group) in self.progress(pending.items(), "match prompts", len(pending)):
            lm = self.resources.base()
            t_unit = time.perf_counter()
            rows, dirs = match_prompt(lm, self.sweep, field, ctx, contexts, {k: by_key[k].get(pid, {}) for k in keys},
                                      prompt_method_rows(cells, methods, pid), [part for part, _ in group])
            for part, ukey in group:
                write_parquet(self.rundir.unit("match", ukey),
                              pl.DataFrame([r for r in rows if r["method"] == part], schema=MATCHED_SCHEMA))
            spent["match:dose"] += time.perf_counter() - t_unit
            if exp.completions.enabled:
                t_unit = time.perf_counter()
                comp = matched_completions(lm, self.sampling, self.families, ctx, rows, dirs, baseline)
                if prompt_completions is not None:  # a prompt has no dose: its sampled texts as they are
                    comp = pl.concat([comp, prompt_completions.filter(pl.col("prompt_id") == pid)], how="vertical")
                for part, ukey in group:
                    write_parquet(self.rundir.unit("match_completions", ukey), comp.filter(pl.col("method") == part))
                spent["match:completions"] += time.perf_counter() - t_unit
        injecting = [k for k in keys if methods[k].intervention == "activation"]

        def assemble(stage: str, schema: Any) -> pl.DataFrame:
            frames = [read_table(self.rundir.unit(stage, u), schema, fix=RECOMPUTE) for _, _, u in units]
            by_prompt = [pl.concat(frames[i:i + len(parts)], how="vertical") for i in range(0, len(frames), len(parts))]
            return pl.concat([expand_shared(f, injecting) for f in by_prompt], how="vertical")

        write_parquet(self.rundir.matched, assemble("match", MATCHED_UNIT))
        if exp.completions.enabled:
            write_parquet(self.rundir.matched_completions, assemble("match_completions", COMPLETION_UNIT))
        self._mark_done("match", key)
        if todo:
            self.resources.note("match")
        self.timings["match"] = time.perf_counter() - t
        self.timings.update(spent)

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
