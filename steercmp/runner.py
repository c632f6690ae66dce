"""The staged runner: extract -> propose -> score -> completions -> report.

One model is resident at a time (:class:`ResourceManager`); the base model is loaded for
extraction, released while methods load their own models (AV, AR, SAE), and reloaded for
scoring. Each stage's outputs are keyed by a hash of what determines them, so a rerun reuses
finished stages and ``--fresh`` ignores them.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import polars as pl
import torch

from steercmp import __version__
from steercmp.api import (
    PROPOSAL_FAMILIES,
    TARGET_CONDITION,
    UNRELATED_CONDITION,
    Control,
    Method,
    MethodRuntime,
    PromptContext,
    Proposal,
    Resource,
)
from steercmp.battery import Battery, check_against_tokenizer
from steercmp.config import Experiment
from steercmp.engine import ScoreRow, extract, tokenize_prompt
from steercmp.errors import ConfigError, NumericalError, PluginError, SteercmpError
from steercmp.memory import gib, model_bytes, peak_rss_bytes, reset_peak, rss_bytes
from steercmp.models import LoadedModel, load_base_model, release
from steercmp.plugin_manager import PluginSet
from steercmp.scoring import FormPlan, plan_forms
from steercmp.store import (
    ensure_writable_dir,
    read_json,
    read_tensors,
    stable_hash,
    write_json,
    write_parquet,
    write_tensors,
    write_text,
)

STAGES = ("extract", "propose", "score", "completions", "report")
#: bump a stage's version when its outputs change meaning; the code hash below also covers edits
STAGE_VERSIONS = {"extract": "2", "propose": "2", "score": "2", "completions": "2", "report": "1"}
#: the modules whose source determines each stage's outputs (hashed into the stage keys)
STAGE_CODE = {
    "extract": ("steercmp.engine", "steercmp.positions", "steercmp.injection", "steercmp.models"),
    "propose": ("steercmp.api",),
    "score": ("steercmp.sweep", "steercmp.scoring", "steercmp.engine", "steercmp.injection",
              "steercmp.battery"),
    "completions": ("steercmp.completions", "steercmp.injection"),
}
_CODE_HASHES: dict[str, str] = {}


def _file_digest(path: Path) -> str:
    key = str(path)
    if key not in _CODE_HASHES:
        _CODE_HASHES[key] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return _CODE_HASHES[key]


def module_code_hash(module_name: str) -> str:
    """A hash of a module's source; for a module inside a plugin package, of the whole package
    (an NLA edit in ``av.py`` must invalidate the NLA method's proposals)."""
    import importlib

    module = sys.modules.get(module_name) or importlib.import_module(module_name)
    file = getattr(module, "__file__", None)
    if not file:
        return "builtin"
    path = Path(file)
    if path.name == "__init__.py" or module_name.count(".") >= 2:
        files = sorted(path.parent.rglob("*.py"))
        return stable_hash([(str(f.relative_to(path.parent)), _file_digest(f)) for f in files])
    return _file_digest(path)


def stage_code_hash(stage: str) -> str:
    return stable_hash({"version": STAGE_VERSIONS[stage], "steercmp": __version__,
                        "modules": {m: module_code_hash(m) for m in STAGE_CODE.get(stage, ())}})


def derive_seed(*key: object) -> int:
    """A 63-bit seed from the run seed and a row identity (never from call order)."""
    digest = hashlib.sha256("|".join(map(str, key)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_generator(*key: object) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(derive_seed(*key))
    return g


def tqdm_progress(enabled: bool) -> Callable[..., Any]:
    from tqdm.auto import tqdm

    def progress(iterable: Any, desc: str, total: int | None = None) -> Any:
        return tqdm(iterable, desc=desc, total=total, disable=not enabled, leave=False, file=sys.stderr)

    return progress


class ResourceManager:
    """Keeps ONE heavy object resident; loading another releases it first. Logs memory per stage."""

    def __init__(self, experiment: Experiment, progress: bool, log: Callable[[str], None]):
        self.experiment = experiment
        self.progress = progress
        self.log = log
        self.resident: tuple[str, Any] | None = None
        self.memory: list[dict[str, Any]] = []

    def acquire(self, name: str, loader: Callable[[], Any]) -> Any:
        if self.resident is not None and self.resident[0] == name:
            return self.resident[1]
        self.release()
        reset_peak()
        start = time.perf_counter()
        obj = loader()
        self.resident = (name, obj)
        held = _object_bytes(obj)
        self.memory.append({"stage": f"load {name}", "resident": name, "model_bytes": held,
                            "rss_bytes": rss_bytes(), "load_seconds": time.perf_counter() - start})
        return obj

    def note(self, stage: str) -> None:
        """Record memory at the end of a stage (peak since the last model load)."""
        name = self.resident[0] if self.resident else None
        held = _object_bytes(self.resident[1]) if self.resident else 0
        entry = {"stage": stage, "resident": name, "model_bytes": held, "rss_bytes": rss_bytes(),
                 "peak_rss_bytes": peak_rss_bytes()}
        if torch.cuda.is_available():
            entry["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated())
        self.memory.append(entry)
        self.log(f"  memory after {stage}: resident={name} model={gib(held)} rss={gib(entry['rss_bytes'])} "
                 f"peak={gib(entry['peak_rss_bytes'])}")

    def release(self) -> None:
        if self.resident is None:
            return
        _name, obj = self.resident
        self.resident = None
        if isinstance(obj, LoadedModel):
            obj.unload()
        else:
            unload = getattr(obj, "unload", None)
            if callable(unload):
                unload()
        del obj
        release(None)

    def base(self) -> LoadedModel:
        spec = self.experiment.model
        return self.acquire("base", lambda: load_base_model(
            spec.id, dtype=spec.dtype, device=spec.device, device_map=spec.device_map,
            trust_remote_code=spec.trust_remote_code, revision=spec.revision, progress=self.progress))


def _object_bytes(obj: Any) -> int:
    if isinstance(obj, LoadedModel):
        return model_bytes(obj.model) if obj.model is not None else 0
    if isinstance(obj, torch.nn.Module):
        return model_bytes(obj)
    inner = getattr(obj, "model", None)
    if isinstance(inner, torch.nn.Module):
        return model_bytes(inner)
    return 0


class RunnerRuntime(MethodRuntime):
    """The runtime a method sees: staged loading through the shared ResourceManager."""

    def __init__(self, runner: Runner, method_key: str):
        self._runner = runner
        self._key = method_key
        exp = runner.experiment
        self.seed = exp.seed
        self.layer = exp.layer
        self.device = exp.model.device
        self.dtype = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16}.get(exp.model.dtype, torch.float32)
        self.run_dir = runner.run_dir

    @contextmanager
    def load(self, resource: Resource) -> Iterator[Any]:
        obj = self._runner.resources.acquire(f"{self._key}:{resource.name}", resource.loader)
        yield obj
        self._runner.resources.note(f"{self._key}:{resource.name}")

    @contextmanager
    def base(self) -> Iterator[LoadedModel]:
        yield self._runner.resources.base()

    def generator(self, *key: object) -> torch.Generator:
        return make_generator(self.seed, self._key, *key)

    def progress(self, iterable: Any, desc: str, total: int | None = None) -> Iterator[Any]:
        return self._runner.progress(iterable, f"{self._key}: {desc}", total)

    def write_table(self, name: str, rows: Sequence[Mapping[str, Any]]) -> None:
        df = pl.DataFrame([dict(r) for r in rows]) if rows else pl.DataFrame()
        write_parquet(self._runner.run_dir / "methods" / self._key / f"{name}.parquet", df)

    def cached(self, name: str, key: Mapping[str, Any], compute: Callable[[], Any]) -> Any:
        path = self._runner.run_dir / "methods" / self._key / "cache" / f"{name}-{stable_hash(key)}.json"
        if path.exists() and not self._runner.fresh:
            return read_json(path)
        value = compute()
        write_json(path, value)
        return value


@attrs.define
class Cell:
    """One row of ``cells.parquet`` before scoring."""

    prompt_id: str
    method: str
    condition: str
    alpha: float
    scaling: str
    status: str
    position: int
    inject_pos: int
    score_pos: int
    delta_norm: float
    meta: dict[str, Any]
    row: ScoreRow | None = None
    baseline: bool = False


class Runner:
    """Runs one experiment into one run directory."""

    def __init__(self, experiment: Experiment, plugins: PluginSet, run_dir: Path, *,
                 fresh: bool = False, progress: bool = True, log: Callable[[str], None] | None = None):
        self.experiment = experiment
        self.plugins = plugins
        self.run_dir = Path(run_dir)
        self.fresh = fresh
        self.progress = tqdm_progress(progress)
        self.show_progress = progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.resources = ResourceManager(experiment, progress, self.log)
        self.battery: Battery = experiment.battery()
        self.methods: dict[str, Method] = {}
        self.controls: dict[str, Control] = {}
        self.timings: dict[str, float] = {}
        self.reused: list[str] = []
        self.reused_units: dict[str, dict[str, int]] = {}
        self.stage_keys: dict[str, str] = {}
        self.failures: list[SteercmpError] = []
        self._model_identity: Any = None

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        """Everything that can be checked before a model loads."""
        exp = self.experiment
        for spec in exp.methods:
            if spec.name not in self.plugins.methods:
                raise ConfigError(f"unknown method {spec.name!r}", where=f"{exp.source}: methods",
                                  fix=f"use one of {', '.join(sorted(self.plugins.methods)) or 'none loaded'}"
                                      " (see `steercmp plugins`)")
            cls = self.plugins.method(spec.name)
            try:
                method = cls(spec.options, exp)
                method.validate()
            except SteercmpError as exc:
                raise _in_file(exc, exp.source, f"methods.{spec.key}.options") from None
            except Exception as exc:
                raise PluginError(f"method {spec.name!r} rejected its options: {type(exc).__name__}: {exc}",
                                  where=f"{exp.source}: methods.{spec.key}.options",
                                  fix="check the method's documented options") from exc
            self.methods[spec.key] = method
        for name in exp.controls:
            if name in (TARGET_CONDITION, UNRELATED_CONDITION):
                continue
            if name not in self.plugins.controls:
                raise ConfigError(f"unknown control {name!r}", where=f"{exp.source}: controls",
                                  fix=f"use one of {', '.join(sorted(self.plugins.controls))}")
            try:
                self.controls[name] = self.plugins.control(name)(exp.control_options.get(name, {}))
            except SteercmpError as exc:
                raise _in_file(exc, exp.source, f"control_options.{name}") from None
        unknown_opts = sorted(set(exp.control_options) - set(exp.controls))
        if unknown_opts:
            raise ConfigError(f"control_options names {unknown_opts[0]!r}, which is not in `controls`",
                              where=f"{exp.source}: control_options.{unknown_opts[0]}",
                              fix="add it to `controls` or remove its options")
        check_model_source(exp)
        n_layers = known_layer_count(exp.model.id)
        if n_layers is not None and not 0 <= exp.layer < n_layers:
            raise ConfigError(f"layer {exp.layer} is out of range for {exp.model.id} ({n_layers} blocks)",
                              where=f"{exp.source}: layer", fix=f"use 0..{n_layers - 1}")

    # ---------------------------------------------------------------- stages
    def run(self, steps: Sequence[str] = STAGES) -> pl.DataFrame | None:
        """Validate everything, then run ``steps``; nothing is written before validation passes."""
        self.validate()
        if any(s in steps for s in ("extract", "propose", "score", "completions")) and not \
                self._reusable("extract", self.extract_key(), self.run_dir / "activations.safetensors",
                               self.run_dir / "contexts.json"):
            self.preflight()
        ensure_writable_dir(self.run_dir)
        write_text(self.run_dir / "config.yaml", self.experiment.snapshot())
        cells = None
        contexts: list[PromptContext] | None = None
        proposals: dict[str, list[Proposal]] | None = None
        if "extract" in steps or any(s in steps for s in ("propose", "score", "completions")):
            contexts = self.stage_extract(run="extract" in steps)
        if any(s in steps for s in ("propose", "score", "completions")):
            assert contexts is not None
            proposals = self.stage_propose(contexts, run="propose" in steps)
        if "score" in steps or "completions" in steps:
            assert contexts is not None and proposals is not None
            plan = _LazyCells(self, contexts, proposals)
            if "score" in steps:
                cells = self.stage_score(plan)
            if "completions" in steps and self.experiment.completions.enabled:
                self.stage_completions(plan, cells)
        self.resources.release()
        self.write_manifest()
        if "report" in steps:
            self.stage_report()
        return cells

    def preflight(self) -> None:
        """Tokenizer checks (family words, position rules) with the tokenizer only: no model loads
        and nothing is written until the battery passes."""
        exp = self.experiment
        tokenizer = load_tokenizer(exp)
        check_against_tokenizer(self.battery, tokenizer, require_single_token=exp.single_token_families)

    def _stage_key(self, stage: str, payload: Any) -> str:
        return stable_hash({"stage": stage, "code": stage_code_hash(stage), "payload": payload})

    def model_identity(self) -> dict[str, Any]:
        """The base model's id, revision and file hashes (cached: a warm run re-reads nothing)."""
        if self._model_identity is None:
            from steercmp.provenance import checkpoint_identity

            spec = self.experiment.model
            ident = checkpoint_identity(spec.id, spec.revision)
            self._model_identity = {"id": spec.id, "revision": ident.get("revision"),
                                    "files": ident.get("files", {})}
        return self._model_identity

    def _reusable(self, stage: str, key: str, *paths: Path) -> bool:
        state_path = self.run_dir / "stages.json"
        if self.fresh or not state_path.exists():
            return False
        state = read_json(state_path)
        return state.get(stage) == key and all(p.exists() for p in paths)

    def _mark_done(self, stage: str, key: str) -> None:
        state_path = self.run_dir / "stages.json"
        state = read_json(state_path) if state_path.exists() else {}
        state[stage] = key
        self.stage_keys[stage] = key
        write_json(state_path, state)

    def extract_key(self) -> str:
        exp = self.experiment
        model = attrs.asdict(exp.model)
        model.pop("device", None)  # the same numbers are expected on any device of one dtype
        model.pop("device_map", None)
        return self._key_for("extract", {"model": model, "checkpoint": self.model_identity(),
                                         "layer": exp.layer, "battery": self.battery.content_hash(),
                                         "single_token_families": exp.single_token_families})

    def _key_for(self, stage: str, payload: Any) -> str:
        return self._stage_key(stage, payload)

    def stage_extract(self, run: bool = True) -> list[PromptContext]:
        exp = self.experiment
        key = self.extract_key()
        act_path = self.run_dir / "activations.safetensors"
        meta_path = self.run_dir / "contexts.json"
        if self._reusable("extract", key, act_path, meta_path) or (not run and act_path.exists()):
            self.reused.append("extract")
            return self._load_contexts(act_path, meta_path)
        if not run:
            raise ConfigError("no extracted activations in this run directory", where=str(self.run_dir),
                              fix="run `--step extract` first (or `--step all`)")
        t = time.perf_counter()
        self.log(f"[extract] {exp.model.id} layer {exp.layer}, {len(self.battery)} prompts")
        lm = self.resources.base()
        if not 0 <= exp.layer < lm.num_layers:
            raise ConfigError(f"layer {exp.layer} is out of range for {exp.model.id} ({lm.num_layers} blocks)",
                              where=f"{exp.source}: layer", fix=f"use 0..{lm.num_layers - 1}")
        check_against_tokenizer(self.battery, lm.tokenizer, require_single_token=exp.single_token_families)
        contexts = extract(lm, exp.layer, self.battery.prompts, chat_template=exp.model.chat_template,
                           progress=self.progress)
        for c in contexts:
            if not torch.isfinite(c.resid).all():
                raise NumericalError(
                    f"the base model produced NaN or inf activations at layer {exp.layer} for prompt "
                    f"{c.prompt.id!r}", where=f"{exp.source}: model.id",
                    fix="check the checkpoint's weights, or use float32 instead of float16")
        write_tensors(act_path, {c.prompt.id: c.resid for c in contexts},
                      {"layer": str(exp.layer), "model": exp.model.id})
        write_json(meta_path, {c.prompt.id: {"input_ids": list(c.input_ids), "inject_pos": c.inject_pos,
                                             "score_pos": c.score_pos} for c in contexts})
        self._mark_done("extract", key)
        self.resources.note("extract")
        self.timings["extract"] = time.perf_counter() - t
        return contexts

    def _load_contexts(self, act_path: Path, meta_path: Path) -> list[PromptContext]:
        tensors = read_tensors(act_path)
        meta = read_json(meta_path)
        return [PromptContext(prompt=p, input_ids=tuple(meta[p.id]["input_ids"]),
                              inject_pos=meta[p.id]["inject_pos"], score_pos=meta[p.id]["score_pos"],
                              layer=self.experiment.layer, resid=tensors[p.id])
                for p in self.battery.prompts]

    def propose_key(self, spec_key: str) -> str:
        spec = next(s for s in self.experiment.methods if s.key == spec_key)
        cls = self.plugins.method(spec.name)
        return self._key_for("propose", {"extract": self.extract_key(), "method": spec.name,
                                         "method_code": module_code_hash(cls.__module__),
                                         "options": dict(spec.options), "seed": self.experiment.seed})

    def stage_propose(self, contexts: list[PromptContext], run: bool = True) -> dict[str, list[Proposal]]:
        t = time.perf_counter()
        out: dict[str, list[Proposal]] = {}
        for spec in self.experiment.methods:
            method = self.methods[spec.key]
            key = self.propose_key(spec.key)
            tpath = self.run_dir / "proposals" / f"{spec.key}.safetensors"
            jpath = self.run_dir / "proposals" / f"{spec.key}.json"
            if self._reusable(f"propose:{spec.key}", key, tpath, jpath) or (not run and jpath.exists()):
                self.reused.append(f"propose:{spec.key}")
                out[spec.key] = _load_proposals(tpath, jpath)
                continue
            if not run:
                raise ConfigError(f"no proposals for method {spec.key!r} in this run directory",
                                  where=str(self.run_dir), fix="run `--step propose` first")
            self.log(f"[propose] {spec.key}")
            runtime = RunnerRuntime(self, spec.key)
            try:
                proposals = list(method.propose(contexts, runtime))
                _check_proposals(spec.key, proposals, contexts, self.experiment.scalings)
            except Exception as exc:
                # one failing method must not cost the others' results: record it and go on
                self._fail(spec.key, "proposing", exc)
                continue
            _save_proposals(tpath, jpath, proposals)
            self._mark_done(f"propose:{spec.key}", key)
            out[spec.key] = proposals
        self.timings["propose"] = time.perf_counter() - t
        return out

    def build_cells(self, contexts: list[PromptContext], proposals: dict[str, list[Proposal]]) -> list[Cell]:
        """Every prompt x method x condition x alpha x scaling, with the row to score.

        A method whose proposals or controls cannot be turned into cells is recorded as a failure
        and left out; the other methods' cells are kept."""
        exp = self.experiment
        plans: dict[str, FormPlan] = {}
        cells: list[Cell] = []
        for spec in exp.methods:
            if spec.key not in proposals:  # the method failed; its error is reported at the end
                continue
            try:
                cells.extend(self._method_cells(spec.key, contexts, proposals[spec.key], plans))
            except Exception as exc:
                self._fail(spec.key, "building its cells", exc)
                proposals.pop(spec.key, None)
        return cells

    def _method_cells(self, key: str, contexts: list[PromptContext], props: list[Proposal],
                      plans: dict[str, FormPlan]) -> list[Cell]:
        exp = self.experiment
        method = self.methods[key]
        by_key = {(p.prompt_id, p.family): p for p in props}
        cells: list[Cell] = []
        for ctx in contexts:
            pid = ctx.prompt.id
            conditions: list[tuple[str, Proposal | None, str]] = []
            target = by_key[(pid, "edited")]
            conditions.append((TARGET_CONDITION, target, target.status))
            unrelated = by_key[(pid, "unrelated")]
            conditions.append((UNRELATED_CONDITION, unrelated, unrelated.status))
            for cname, control in self.controls.items():
                if target.status == "dropped":
                    conditions.append((cname, None, "dropped"))
                elif not control.applies_to(method):
                    conditions.append((cname, None, "not_applicable"))
                else:
                    gen = make_generator(exp.seed, key, pid, cname)
                    derived = control.derive(target, ctx, gen)
                    if derived.delta is not None and not torch.isfinite(derived.delta).all():
                        raise NumericalError(f"control {cname!r} derived a NaN or inf delta from method "
                                             f"{key!r}'s proposal for {pid!r}",
                                             fix="check the method's delta norms")
                    conditions.append((cname, derived, target.status))
            for cond, prop, status in conditions:
                for scaling in exp.scalings:
                    for alpha in exp.alphas:
                        if prop is None or status == "dropped":
                            cells.append(Cell(pid, key, cond, alpha, scaling, status, ctx.inject_pos,
                                              ctx.inject_pos, ctx.score_pos, 0.0, {}))
                            continue
                        if pid not in plans:
                            plans[pid] = plan_forms(self._tokenizer(), ctx.prompt.families)
                        cells.append(self._cell(ctx, key, cond, prop, status, alpha, scaling, plans[pid]))
        return cells

    def _fail(self, method: str, doing: str, exc: BaseException) -> None:
        """Record one method's failure (its name in the message) and carry on with the others."""
        if isinstance(exc, SteercmpError):
            err = exc
            where = exc.where or f"{self.experiment.source}: methods.{method}"
            message = exc.message if method in exc.message else f"method {method!r}: {exc.message}"
            err = type(exc)(message, where=where, fix=exc.fix)
        else:
            err = PluginError(f"method {method!r} raised while {doing}: {type(exc).__name__}: {exc}",
                              where=f"{self.experiment.source}: methods.{method}",
                              fix="see the method's documentation or report a bug to its author")
        self.failures.append(err)
        self.log(f"[{doing}] {method} FAILED: {err.one_line()}")

    def _tokenizer(self) -> Any:
        lm = self.resources.base()
        return lm.tokenizer

    def _cell(self, ctx: PromptContext, method: str, cond: str, prop: Proposal, status: str,
              alpha: float, scaling: str, plan: FormPlan) -> Cell:
        meta = dict(prop.meta)
        if prop.prompt_text is not None:
            lm = self.resources.base()
            ids, inject, score = tokenize_prompt(lm, ctx.prompt, self.experiment.model.chat_template,
                                                 text=prop.prompt_text)
            delta = torch.zeros(ctx.d_model)
            row = ScoreRow(ids, score, plan, delta, 0.0, inject, "raw")
            meta["alpha_applies"] = False
            return Cell(ctx.prompt.id, method, cond, alpha, scaling, status, inject, inject, score, 0.0,
                        meta, row, baseline=cond == "noop")
        assert prop.delta is not None
        pos = prop.position if prop.position is not None else ctx.inject_pos
        norm = prop.delta_norm
        zero_effect = alpha == 0.0 or norm == 0.0
        row = ScoreRow(ctx.input_ids, ctx.score_pos, plan, prop.delta.float(), alpha, pos, scaling)
        return Cell(ctx.prompt.id, method, cond, alpha, scaling, status, pos, ctx.inject_pos, ctx.score_pos,
                    norm, meta, row, baseline=zero_effect)

    # ---------------------------------------------------------------- units
    def _controls_identity(self) -> list[Any]:
        exp = self.experiment
        return [[name, dict(exp.control_options.get(name, {})),
                 module_code_hash(type(self.controls[name]).__module__)] for name in self.controls]

    def _unit_payload(self, method: str, pid: str, alphas: Sequence[float]) -> dict[str, Any]:
        exp = self.experiment
        return {"propose": self.propose_key(method), "prompt": pid, "alphas": list(alphas),
                "scalings": list(exp.scalings), "controls": self._controls_identity(), "seed": exp.seed}

    def score_unit_key(self, method: str, pid: str) -> str:
        """What one (method, prompt) block of cells depends on, and nothing else."""
        return stable_hash({"code": stage_code_hash("score"),
                            **self._unit_payload(method, pid, self.experiment.alphas)})

    def completion_unit_key(self, method: str, pid: str) -> str:
        exp = self.experiment
        alphas = [a for a in exp.alphas if a in exp.completions.alphas]
        return stable_hash({"code": stage_code_hash("completions"), "score_code": stage_code_hash("score"),
                            "completions": attrs.asdict(exp.completions),
                            **self._unit_payload(method, pid, alphas)})

    def _units(self, methods: Sequence[str], unit_key: Callable[[str, str], str]) -> list[tuple[str, str, str]]:
        return [(m, p.id, unit_key(m, p.id)) for m in methods for p in self.battery.prompts]

    def _unit_path(self, stage: str, key: str) -> Path:
        return self.run_dir / "units" / stage / f"{key}.parquet"

    def _unit_done(self, stage: str, key: str) -> bool:
        return not self.fresh and self._unit_path(stage, key).exists()

    def score_key(self) -> str:
        methods = [s.key for s in self.experiment.methods]
        return self._key_for("score", [u for _, _, u in self._units(methods, self.score_unit_key)])

    def completions_key(self) -> str:
        methods = [s.key for s in self.experiment.methods]
        return self._key_for("completions", [u for _, _, u in self._units(methods, self.completion_unit_key)])

    def _pending_units(self, stage: str, units: list, key: str, plan: _LazyCells
                       ) -> tuple[list, list, str]:
        """Split a stage's (method, prompt) units into all and still-to-compute, and log it.

        Building cells may drop a failing method; its units then leave the stage (and its key).
        """
        todo = [u for u in units if not self._unit_done(stage, u[2])]
        if todo:
            plan.build()
            units = [u for u in units if u[0] in plan.methods]
            todo = [u for u in todo if u[0] in plan.methods]
            key = self._key_for(stage, [u for _, _, u in units])
        self.reused_units[stage] = {"reused": len(units) - len(todo), "computed": len(todo)}
        self.log(f"[{stage}] {len(units)} units (method x prompt): {len(units) - len(todo)} reused, "
                 f"{len(todo)} to compute")
        return units, todo, key

    def stage_score(self, plan: _LazyCells) -> pl.DataFrame:
        """Score every cell, one (method, prompt) unit at a time; finished units are reused."""
        path = self.run_dir / "cells.parquet"
        units = self._units(plan.methods, self.score_unit_key)
        key = self._key_for("score", [u for _, _, u in units])
        if self._reusable("score", key, path):
            self.reused.append("score")
            df = pl.read_parquet(path)
            self._report_error_cells(df)
            return df
        t = time.perf_counter()
        units, todo, key = self._pending_units("score", units, key, plan)
        for method, pid, ukey in self.progress(todo, "score units", len(todo)):
            records = self._score_unit(plan.cells(method, pid))
            write_parquet(self._unit_path("score", ukey), pl.DataFrame(records, schema=CELL_SCHEMA))
        frames = [pl.read_parquet(self._unit_path("score", u)) for _, _, u in units]
        df = pl.concat(frames, how="vertical") if frames else pl.DataFrame(schema=CELL_SCHEMA)
        write_parquet(path, df)
        self._mark_done("score", key)
        if todo:
            self.resources.note("score")
        self.timings["score"] = time.perf_counter() - t
        self._report_error_cells(df)
        return df

    def _score_unit(self, cells: Sequence[Cell]) -> list[dict[str, Any]]:
        from steercmp.sweep import score_rows_fast

        # identical rows (every alpha-0 or zero-delta row of a context is the unsteered model) score once
        unique: dict[Any, int] = {}
        rows: list[ScoreRow] = []
        index: list[int | None] = []
        for c in cells:
            if c.row is None:
                index.append(None)
                continue
            r = c.row
            ukey = (r.input_ids, r.score_pos) if c.baseline else id(c)
            if ukey not in unique:
                unique[ukey] = len(rows)
                rows.append(r if not c.baseline else attrs.evolve(r, alpha=0.0))
            index.append(unique[ukey])
        lm, layer = self.resources.base(), self.experiment.layer
        try:
            masses = score_rows_fast(lm, layer, rows, batch_size=self.experiment.batch_size) if rows else {}
        except NumericalError:
            # some row overflowed: score row by row so only the rows at fault become errors
            masses = {f: torch.full((len(rows),), float("nan")) for f in ("edited", "original", "unrelated")}
            for j, r in enumerate(rows):
                try:
                    one = score_rows_fast(lm, layer, [r], batch_size=1)
                except NumericalError:
                    continue
                for f in masses:
                    masses[f][j] = one[f][0]
        records = []
        for c, i in zip(cells, index, strict=True):
            vals = {f: (float(masses[f][i]) if i is not None else None) for f in ("edited", "original", "unrelated")}
            status, meta = c.status, dict(c.meta)
            if i is not None and not all(math.isfinite(v) for v in vals.values()):  # type: ignore[arg-type]
                status, meta["error"] = "error", "NaN or inf logits"
                vals = {f: None for f in vals}
            score = None if vals["edited"] is None else vals["edited"] - vals["original"]  # type: ignore[operator]
            records.append({
                "prompt_id": c.prompt_id, "method": c.method, "condition": c.condition, "alpha": c.alpha,
                "scaling": c.scaling, "position": c.position, "inject_pos": c.inject_pos,
                "score_pos": c.score_pos, "delta_norm": c.delta_norm,
                "logmass_edited": vals["edited"], "logmass_original": vals["original"],
                "logmass_unrelated": vals["unrelated"], "score": score, "status": status,
                "meta": json.dumps(meta, sort_keys=True, default=str),
            })
        return records

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

    def stage_completions(self, plan: _LazyCells, scored: pl.DataFrame | None = None) -> None:
        """Sample completions one (method, prompt) unit at a time; finished units are reused."""
        from steercmp.completions import COMPLETION_SCHEMA, sample_completions

        exp = self.experiment
        path = self.run_dir / "completions.parquet"
        units = self._units(plan.methods, self.completion_unit_key)
        key = self._key_for("completions", [u for _, _, u in units])
        if self._reusable("completions", key, path):
            self.reused.append("completions")
            return
        t = time.perf_counter()
        if scored is None and (self.run_dir / "cells.parquet").exists():
            scored = pl.read_parquet(self.run_dir / "cells.parquet")
        errors = set()
        if scored is not None:
            errors = set(scored.filter(pl.col("status") == "error")
                         .select("prompt_id", "method", "condition", "alpha", "scaling").iter_rows())
        units, todo, key = self._pending_units("completions", units, key, plan)
        failed: set[str] = set()
        for method, pid, ukey in self.progress(todo, "completion units", len(todo)):
            if method in failed:
                continue
            chosen = []
            for c in plan.cells(method, pid):
                if c.alpha not in exp.completions.alphas:
                    continue
                if (c.prompt_id, c.method, c.condition, c.alpha, c.scaling) in errors:
                    c = attrs.evolve(c, row=None, status="error")
                chosen.append(c)
            try:
                df = sample_completions(self.resources.base(), exp, chosen, self.battery)
            except Exception as exc:
                self._fail(method, "sampling completions", exc)
                failed.add(method)
                continue
            write_parquet(self._unit_path("completions", ukey), df)
        frames = [pl.read_parquet(self._unit_path("completions", u)) for m, _, u in units if m not in failed]
        df = (pl.concat(frames, how="vertical") if frames else pl.DataFrame(schema=COMPLETION_SCHEMA))
        df = df.sort("method", "condition", "scaling", "alpha", "prompt_id", "seed", nulls_last=True)
        write_parquet(path, df)
        if not failed:
            self._mark_done("completions", key)
        if todo:
            self.resources.note("completions")
        self.timings["completions"] = time.perf_counter() - t

    def stage_report(self) -> Path | None:
        from steercmp.report import write_report

        t = time.perf_counter()
        out = write_report(self.run_dir, decision_alphas=list(self.experiment.decision_alphas),
                           seed=self.experiment.seed)
        self.timings["report"] = time.perf_counter() - t
        return out

    def write_manifest(self) -> None:
        from steercmp.provenance import build_manifest

        manifest = build_manifest(self)
        write_json(self.run_dir / "manifest.json", manifest)


class _LazyCells:
    """The cells plan, built only when a unit has to be computed (it needs the tokenizer, so the
    base model): a fully reused run never loads a model for scoring or completions."""

    def __init__(self, runner: Runner, contexts: list[PromptContext], proposals: dict[str, list[Proposal]]):
        self.runner = runner
        self.contexts = contexts
        self.proposals = proposals
        self._groups: dict[tuple[str, str], list[Cell]] | None = None

    @property
    def methods(self) -> list[str]:
        return [s.key for s in self.runner.experiment.methods if s.key in self.proposals]

    def build(self) -> None:
        if self._groups is None:
            groups: dict[tuple[str, str], list[Cell]] = {}
            for c in self.runner.build_cells(self.contexts, self.proposals):
                groups.setdefault((c.method, c.prompt_id), []).append(c)
            self._groups = groups

    def all(self) -> list[Cell]:
        self.build()
        assert self._groups is not None
        return [c for cells in self._groups.values() for c in cells]

    def cells(self, method: str, prompt_id: str) -> list[Cell]:
        self.build()
        assert self._groups is not None
        return self._groups.get((method, prompt_id), [])


def _in_file(exc: SteercmpError, source: str, field: str) -> SteercmpError:
    """A plugin's error with the experiment file and field in front (the user edits that file)."""
    where = exc.where or ""
    if source in where:
        return exc
    where = f"{source}: {where}" if where.startswith(("methods", "control_options")) else \
        f"{source}: {field}" + (f" ({where})" if where else "")
    return type(exc)(exc.message, where=where, fix=exc.fix)


def check_model_source(exp: Experiment) -> None:
    """A local model directory must exist, hold config.json and safetensors weights (pickled
    ``.bin`` weights are refused: loading them can run code)."""
    from steercmp.embedded import is_embedded

    mid = exp.model.id
    if is_embedded(mid):
        return
    path = Path(mid).expanduser()
    looks_local = mid.startswith(("/", ".", "~")) or path.exists()
    if not looks_local:
        return  # an HF id: resolved through the cache when the model loads
    where = f"{exp.source}: model.id"
    if not path.exists():
        raise ConfigError(f"model directory {mid!r} does not exist", where=where,
                          fix="give a local checkpoint directory, an HF id (owner/name) or embedded:gemma-3-270m")
    if not path.is_dir():
        raise ConfigError(f"model path {mid!r} is a file, not a checkpoint directory", where=where,
                          fix="point model.id at the directory holding config.json")
    if not (path / "config.json").exists():
        raise ConfigError(f"model directory {mid!r} has no config.json", where=where,
                          fix="point model.id at a Hugging Face checkpoint directory")
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        raise ConfigError(
            f"model directory {mid!r} has no safetensors weights"
            + (f" (found pickled {', '.join(pickled)}, which steercmp refuses to load)" if pickled else ""),
            where=where, fix="convert the weights to safetensors (model.save_pretrained(dir, safe_serialization=True))")


def load_tokenizer(exp: Experiment) -> Any:
    """The base model's tokenizer alone (no weights), for checks before any model loads."""
    from transformers import AutoTokenizer

    from steercmp.models import resolve_source

    spec = exp.model
    path = resolve_source(spec.id, progress=False)
    try:
        return AutoTokenizer.from_pretrained(path, revision=spec.revision,
                                             trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the tokenizer of {spec.id!r}: {str(exc).splitlines()[0]}",
                          where=f"{exp.source}: model.id",
                          fix="give a checkpoint directory with tokenizer files, a cached HF id "
                              "(HF_HUB_OFFLINE=1 uses the cache), or embedded:gemma-3-270m") from None


CELL_SCHEMA = {
    "prompt_id": pl.String, "method": pl.String, "condition": pl.String, "alpha": pl.Float64,
    "scaling": pl.String, "position": pl.Int64, "inject_pos": pl.Int64, "score_pos": pl.Int64,
    "delta_norm": pl.Float64, "logmass_edited": pl.Float64, "logmass_original": pl.Float64,
    "logmass_unrelated": pl.Float64, "score": pl.Float64, "status": pl.String, "meta": pl.String,
}


def _check_proposals(method: str, proposals: Sequence[Proposal], contexts: Sequence[PromptContext],
                     scalings: Sequence[str]) -> None:
    """A method must answer every prompt and family with a finite delta of the right shape."""
    have = {(p.prompt_id, p.family): p for p in proposals}
    d = contexts[0].d_model if contexts else 0
    for ctx in contexts:
        for fam in PROPOSAL_FAMILIES:
            p = have.get((ctx.prompt.id, fam))
            if p is None:
                raise PluginError(f"method {method!r} returned no proposal for prompt {ctx.prompt.id!r}, "
                                  f"family {fam!r}", fix="return one Proposal per prompt and family")
            if p.delta is None:
                continue
            if tuple(p.delta.shape) != (d,):
                raise PluginError(f"method {method!r} proposed a delta of shape {tuple(p.delta.shape)} "
                                  f"for {ctx.prompt.id!r}; expected ({d},)", fix="return a [d_model] vector")
            if not torch.isfinite(p.delta).all():
                raise NumericalError(f"method {method!r} proposed a delta with NaN or inf for "
                                     f"{ctx.prompt.id!r}/{fam}", fix="check the method's inputs")
            if "norm_relative" in scalings and p.status != "dropped" and float(p.delta.norm()) == 0.0:
                raise NumericalError(
                    f"method {method!r} proposed a zero-norm delta for {ctx.prompt.id!r}/{fam} under "
                    "norm_relative scaling (delta/||delta|| is undefined)",
                    fix="use scalings: [raw], or a stricter selection that drops such prompts")


def _save_proposals(tpath: Path, jpath: Path, proposals: Sequence[Proposal]) -> None:
    tensors = {f"{p.prompt_id}|{p.family}": p.delta.float() for p in proposals if p.delta is not None}
    if not tensors:
        tensors = {"__empty__": torch.zeros(1)}
    write_tensors(tpath, tensors)
    write_json(jpath, [{"prompt_id": p.prompt_id, "family": p.family, "position": p.position,
                        "prompt_text": p.prompt_text, "status": p.status, "meta": dict(p.meta),
                        "has_delta": p.delta is not None} for p in proposals])


def _load_proposals(tpath: Path, jpath: Path) -> list[Proposal]:
    tensors = read_tensors(tpath)
    out = []
    for r in read_json(jpath):
        delta = tensors[f"{r['prompt_id']}|{r['family']}"] if r["has_delta"] else None
        out.append(Proposal(prompt_id=r["prompt_id"], family=r["family"], delta=delta, position=r["position"],
                            prompt_text=r["prompt_text"], status=r["status"], meta=r["meta"]))
    return out


KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "embedded:gemma-3-270m": {"layers": 18, "d_model": 640, "params": 268_098_176},
    "google/gemma-3-270m": {"layers": 18, "d_model": 640, "params": 268_098_176},
    "google/gemma-3-1b-it": {"layers": 26, "d_model": 1152, "params": 999_885_952},
    "google/gemma-3-4b-it": {"layers": 34, "d_model": 2560, "params": 4_300_079_472},
    "google/gemma-3-12b-it": {"layers": 48, "d_model": 3840, "params": 12_187_325_040},
    "google/gemma-3-27b-it": {"layers": 62, "d_model": 5376, "params": 27_432_406_640},
    "Qwen/Qwen2.5-7B-Instruct": {"layers": 28, "d_model": 3584, "params": 7_615_616_512},
}


def known_model(model_id: str) -> dict[str, Any] | None:
    """Layer count, width and size for a model without downloading: a table, or a local config."""
    from steercmp.embedded import is_embedded

    if is_embedded(model_id):
        return KNOWN_MODELS["embedded:gemma-3-270m"]
    if model_id in KNOWN_MODELS:
        return KNOWN_MODELS[model_id]
    cfg_path = Path(model_id) / "config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        text = cfg.get("text_config", cfg)
        layers, d = text.get("num_hidden_layers"), text.get("hidden_size")
        params = None
        if layers and d:
            inter = text.get("intermediate_size", 4 * d)
            vocab = text.get("vocab_size", 0)
            params = layers * (4 * d * d + 3 * d * inter) + vocab * d
        return {"layers": layers, "d_model": d, "params": params}
    return None


def known_layer_count(model_id: str) -> int | None:
    info = known_model(model_id)
    return None if info is None else info.get("layers")


def summary_frame(cells: pl.DataFrame) -> pl.DataFrame:
    """The research note's table: per method, scaling, condition and alpha: mean, median, positives."""
    return (cells.filter(pl.col("score").is_not_null())
            .group_by("method", "scaling", "condition", "alpha", maintain_order=True)
            .agg(n=pl.len(), mean=pl.col("score").mean(), median=pl.col("score").median(),
                 positive=(pl.col("score") > 0).sum())
            .sort("method", "scaling", "condition", "alpha"))


def format_table(df: pl.DataFrame) -> str:
    """Plain-text table (no dependency on a terminal width)."""
    cols = df.columns
    rows = [[_fmt(v) for v in r] for r in df.iter_rows()]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:+.3f}"
    return str(v)


__all__ = ["Runner", "STAGES", "derive_seed", "format_table", "summary_frame", "__version__"]
