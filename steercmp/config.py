"""Experiment configuration: frozen attrs classes built from YAML, validated before models load."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import yaml

from steercmp.api import SCALINGS, RunSettings
from steercmp.battery import Battery, check_rule_syntax, read_yaml
from steercmp.battery_files import (
    _base_dir,
    _battery_file,
    _resolve,
    _shipped_list,
    resolve_battery,
)
from steercmp.catalog import DTYPE_BYTES, EMBEDDED_ID, is_embedded
from steercmp.decision_settings import (
    DEFAULT_MIN_EFFECT,
    DEFAULT_RANDOM_DRAWS,
    check_correction,
    check_level,
    matched_settings,
)
from steercmp.errors import ConfigError
from steercmp.redact import redact

DEFAULT_CONTROLS = ("noop", "random_delta", "wrong_position", "paraphrase_edit", "round_trip")


@attrs.frozen
class ModelSpec:
    """The base model: HF id, local directory or ``embedded:gemma-3-270m``."""

    id: str = EMBEDDED_ID
    dtype: str = "float32"
    device: str = "cpu"
    device_map: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    chat_template: bool = False  # wrap prompts as one user turn (instruction models)


@attrs.frozen
class MethodSpec:
    name: str
    options: Mapping[str, Any] = attrs.field(factory=dict)
    label: str | None = None  # run the same method twice under different labels

    @property
    def key(self) -> str:
        return self.label or self.name


@attrs.frozen
class CompletionSpec:
    enabled: bool = True
    seeds: int = 5
    alphas: tuple[float, ...] = (0.0, 2.0)
    max_new_tokens: int = 10
    temperature: float = 1.0
    top_p: float = 1.0


#: the keys the reader accepts, per section (docs/config.md documents each; a meta-test checks)
MODEL_KEYS = frozenset(a.name for a in attrs.fields(ModelSpec))
METHOD_KEYS = frozenset(a.name for a in attrs.fields(MethodSpec))
COMPLETION_KEYS = frozenset(a.name for a in attrs.fields(CompletionSpec))
DECISION_KEYS = frozenset({"alphas", "level", "correction", "min_effect", "max_kl", "random_draws"})

EXPERIMENT_KEYS = frozenset({"name", "description", "model", "layer", "battery", "alphas", "scalings",
                             "methods", "controls", "control_options", "completions", "decision", "seed",
                             "batch_size", "single_token_families", "inject"})
#: old spellings that are rejected with a rename hint: old key -> (new key, fix)
RENAMED_KEYS = {"scaling": ("scalings", "rename `scaling` to `scalings` (a list, e.g. [raw])")}


@attrs.frozen
class Experiment:
    """A whole experiment; ``source`` is the YAML file it came from (for error messages)."""

    name: str
    model: ModelSpec
    layer: int
    battery_path: str
    battery: Battery = attrs.field(eq=False, repr=False)
    alphas: tuple[float, ...]
    scalings: tuple[str, ...]
    methods: tuple[MethodSpec, ...]
    controls: tuple[str, ...] = DEFAULT_CONTROLS
    control_options: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    completions: CompletionSpec = CompletionSpec()
    decision_alphas: tuple[float, ...] = (2.0,)
    decision_level: float = 0.05
    decision_correction: str = "none"
    #: smallest effect of interest, nats of the score: "no effect" means the CI lies below it
    decision_min_effect: float = DEFAULT_MIN_EFFECT
    #: the side-effect budget in nats of off-target KL; None = auto (the positive control's own
    #: KL per prompt where the run has one, else :data:`steercmp.score.dose.DEFAULT_MAX_KL`)
    decision_max_kl: float | None = None
    #: K: draws per prompt of each shared random control (random_delta, random_donor)
    decision_random_draws: int = DEFAULT_RANDOM_DRAWS
    seed: int = 0
    batch_size: int | str = "auto"
    single_token_families: bool = False
    source: str = "<experiment>"
    raw: Mapping[str, Any] = attrs.field(factory=dict, eq=False, repr=False)

    @property
    def base_dir(self) -> Path:
        return _base_dir(self.source)

    @property
    def battery_file(self) -> Path:
        """The battery file ``battery_path`` names: a shipped battery for a short name
        (``note8``), else the path relative to the experiment file's folder."""
        return _battery_file(self.source, self.battery_path)

    def with_prompts(self, prompt_ids: Sequence[str]) -> Experiment:
        """The same experiment on a subset of its battery (a shard of a distributed run)."""
        return attrs.evolve(self, battery=self.battery.subset(prompt_ids))

    def run_settings(self, key: str) -> RunSettings:
        """What method ``key`` is told about this run (:class:`steercmp.api.RunSettings`)."""
        injects, scores = {p.inject for p in self.battery.prompts}, {p.score for p in self.battery.prompts}
        return RunSettings(label=key, layer=self.layer, model_id=self.model.id, model_dtype=self.model.dtype,
                           model_device=self.model.device, chat_template=self.model.chat_template,
                           inject=injects.pop() if len(injects) == 1 else None,
                           score=scores.pop() if len(scores) == 1 else None, seed=self.seed,
                           battery_source=self.battery.source)

    def with_methods(self, keys: Sequence[str]) -> Experiment:  # the first, partial pass of a run
        return attrs.evolve(self, methods=tuple(s for s in self.methods if s.key in set(keys)))

    def resolve(self, path: str) -> Path:
        """A path from the experiment file, relative to that file's folder."""
        return _resolve(self.source, path)

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def snapshot(self) -> str:
        """YAML snapshot of the config as given, with the defaults steercmp filled in."""
        data = dict(self.raw)
        data.setdefault("seed", self.seed)
        data["layer"] = self.layer
        data["alphas"] = list(self.alphas)
        data["scalings"] = list(self.scalings)
        data.setdefault("decision", {})
        data["decision"] = {**dict(data["decision"] or {}), **self.decision_settings()}
        data["battery"] = str(self.battery_file)
        return yaml.safe_dump(redact(data), sort_keys=False)

    def decision_settings(self) -> dict[str, Any]:
        """The pre-declared decision block, defaults filled in (config.yaml and the manifest)."""
        return {"alphas": list(self.decision_alphas), "level": self.decision_level,
                "correction": self.decision_correction, "min_effect": self.decision_min_effect,
                "max_kl": "auto" if self.decision_max_kl is None else self.decision_max_kl,
                "random_draws": self.decision_random_draws}

    @classmethod
    def from_yaml(cls, path: str | Path) -> Experiment:
        path = Path(path)
        data = read_yaml(path, "experiment")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<experiment>", *, battery: Battery | None = None) -> Experiment:
        """Validate ``data`` (a parsed experiment YAML) and load its battery, relative to
        ``source``'s folder; ``battery`` supplies an in-memory battery instead (tests, the kit)."""
        if not isinstance(data, Mapping):
            raise ConfigError("an experiment must be a YAML mapping", where=source,
                              fix="see experiments/embedded.yaml")
        for old, (new, fix) in RENAMED_KEYS.items():
            if old in data:
                raise ConfigError(f"`{old}` is not a key (the key is `{new}`)", where=f"{source}: {old}", fix=fix)
        unknown = sorted(set(data) - EXPERIMENT_KEYS, key=str)
        if unknown:
            raise ConfigError(f"unknown key {unknown[0]!r}", where=f"{source}: {unknown[0]}",
                              fix=f"valid keys are {', '.join(sorted(EXPERIMENT_KEYS))}")
        f = _Fields(source)
        model_raw = data.get("model", {})
        if isinstance(model_raw, str):
            model_raw = {"id": model_raw}
        if not isinstance(model_raw, Mapping):
            raise ConfigError("`model` must be a mapping or an id", where=f"{source}: model",
                              fix="e.g. model: {id: embedded:gemma-3-270m}")
        bad = sorted(set(model_raw) - MODEL_KEYS, key=str)
        if bad:
            raise ConfigError(f"unknown model key {bad[0]!r}", where=f"{source}: model.{bad[0]}",
                              fix=f"valid keys are {', '.join(sorted(MODEL_KEYS))}")
        _check_model_fields(model_raw, source)
        model = ModelSpec(**{k: v for k, v in model_raw.items()})
        if model.dtype not in ("auto", *DTYPE_BYTES):
            raise ConfigError(f"unknown dtype {model.dtype!r}", where=f"{source}: model.dtype",
                              fix="use auto (measured per machine), float32 or bfloat16")
        layer = f.integer(data, "layer", required=True, minimum=0)
        battery_obj = battery
        battery_name = data.get("battery")
        if not isinstance(battery_name, str) or not battery_name.strip():
            problem = ("`battery` is missing" if battery_name is None
                       else f"`battery` must be a name or path, got {battery_name!r}")
            raise ConfigError(problem, where=f"{source}: battery",
                              fix=f"name a shipped battery ({_shipped_list()}) or a battery YAML file")
        alphas = f.numbers(data, "alphas", default=(-2, -1, 0, 1, 2, 4, 8))
        scal = data.get("scalings", ["raw"])
        if isinstance(scal, str):
            scal = [scal]
        if not isinstance(scal, list) or not all(isinstance(s, str) for s in scal):
            raise ConfigError(f"`scalings` must be a list of names, got {scal!r}", where=f"{source}: scalings",
                              fix=f"e.g. scalings: [raw] (names: {', '.join(SCALINGS)})")
        scalings = tuple(scal)
        if len(set(scalings)) != len(scalings):
            raise ConfigError("`scalings` repeats a name", where=f"{source}: scalings", fix="list each scaling once")
        for s in scalings:
            if s not in SCALINGS:
                raise ConfigError(f"unknown scaling {s!r}", where=f"{source}: scalings",
                                  fix=f"use {' or '.join(SCALINGS)}")
        if not scalings:
            raise ConfigError("`scalings` is empty", where=f"{source}: scalings", fix="use [raw]")
        methods_raw = data.get("methods")
        if not isinstance(methods_raw, list) or not methods_raw:
            raise ConfigError("`methods` must be a non-empty list", where=f"{source}: methods",
                              fix="e.g. methods: [{name: unembed_direction}]")
        methods: list[MethodSpec] = []
        for i, m in enumerate(methods_raw):
            if isinstance(m, str):
                m = {"name": m}
            if not isinstance(m, Mapping) or not isinstance(m.get("name"), str):
                raise ConfigError("each method needs a `name`", where=f"{source}: methods[{i}]",
                                  fix="e.g. {name: nla_text_edit, options: {...}}")
            bad = sorted(set(m) - METHOD_KEYS, key=str)
            if bad:
                raise ConfigError(f"unknown method key {bad[0]!r}", where=f"{source}: methods[{i}].{bad[0]}",
                                  fix=f"valid keys are {', '.join(sorted(METHOD_KEYS))}; "
                                      "method options go under `options`")
            opts = m.get("options") or {}
            if not isinstance(opts, Mapping):
                raise ConfigError("`options` must be a mapping", where=f"{source}: methods[{i}].options",
                                  fix="write options as key: value pairs")
            methods.append(MethodSpec(name=m["name"], options=dict(opts), label=m.get("label")))
        keys = [m.key for m in methods]
        dup = next((k for k in keys if keys.count(k) > 1), None)
        if dup:
            raise ConfigError(f"method {dup!r} is listed twice", where=f"{source}: methods",
                              fix="give the second one a distinct `label`")
        controls = data.get("controls", list(DEFAULT_CONTROLS))
        if not isinstance(controls, list) or not all(isinstance(c, str) for c in controls):
            raise ConfigError("`controls` must be a list of names", where=f"{source}: controls",
                              fix="e.g. controls: [noop, random_delta, wrong_position]")
        for i, m in enumerate(methods):
            if m.label is not None and (not isinstance(m.label, str) or not m.label):
                raise ConfigError(f"label {m.label!r} must be a non-empty string",
                                  where=f"{source}: methods[{i}].label", fix="e.g. label: unembed_small")
        for key in ("single_token_families",):
            if key in data and not isinstance(data[key], bool):
                raise ConfigError(f"`{key}` must be true or false, got {data[key]!r}",
                                  where=f"{source}: {key}", fix="write true or false (no quotes)")
        if "name" in data and (not isinstance(data["name"], str) or not data["name"].strip()):
            raise ConfigError(f"`name` must be a non-empty string, got {data['name']!r}",
                              where=f"{source}: name", fix="e.g. name: note8-270m")
        if data.get("description") is not None and not isinstance(data["description"], str):
            raise ConfigError(f"`description` must be text, got {data['description']!r}",
                              where=f"{source}: description", fix="quote it, e.g. description: \"...\"")
        comp_raw = data.get("completions") or {}
        if not isinstance(comp_raw, Mapping):
            raise ConfigError("`completions` must be a mapping", where=f"{source}: completions",
                              fix="e.g. completions: {seeds: 5, alphas: [0, 2]}")
        bad = sorted(set(comp_raw) - COMPLETION_KEYS, key=str)
        if bad:
            raise ConfigError(f"unknown completions key {bad[0]!r}", where=f"{source}: completions.{bad[0]}",
                              fix=f"valid keys are {', '.join(sorted(COMPLETION_KEYS))}")
        cf = _Fields(source, prefix="completions.")
        if not isinstance(comp_raw.get("enabled", True), bool):
            raise ConfigError(f"`enabled` must be true or false, got {comp_raw['enabled']!r}",
                              where=f"{source}: completions.enabled", fix="write true or false (no quotes)")
        completions = CompletionSpec(
            enabled=bool(comp_raw.get("enabled", True)),
            seeds=cf.integer(comp_raw, "seeds", default=5, minimum=1),
            alphas=cf.numbers(comp_raw, "alphas", default=(0, 2)),
            max_new_tokens=cf.integer(comp_raw, "max_new_tokens", default=10, minimum=1),
            temperature=cf.number(comp_raw, "temperature", default=1.0, minimum=0.0),
            top_p=cf.number(comp_raw, "top_p", default=1.0, minimum=0.0),
        )
        decision = data.get("decision") or {}
        if not isinstance(decision, Mapping):
            raise ConfigError("`decision` must be a mapping", where=f"{source}: decision",
                              fix="e.g. decision: {alphas: [2]}")
        bad = sorted(set(decision) - DECISION_KEYS, key=str)
        if bad:
            raise ConfigError(f"unknown decision key {bad[0]!r}", where=f"{source}: decision.{bad[0]}",
                              fix=f"valid keys are {', '.join(sorted(DECISION_KEYS))}")
        decision_alphas = _Fields(source, prefix="decision.").numbers(decision, "alphas", default=(2,))
        level = check_level(decision.get("level", 0.05), where=f"{source}: decision.level")
        correction = check_correction(decision.get("correction", "none"), where=f"{source}: decision.correction")
        min_effect, max_kl, draws = matched_settings(decision, f"{source}: decision.")
        missing = [a for a in decision_alphas if a not in alphas]
        if missing:
            raise ConfigError(f"decision alpha {missing[0]} is not in the alpha sweep",
                              where=f"{source}: decision.alphas", fix="pick decision alphas from `alphas`")
        unsampled = [a for a in decision_alphas if a not in completions.alphas]
        if completions.enabled and unsampled:
            # the decision rule needs completions at every decision alpha, or no method can win
            raise ConfigError(f"decision alpha {unsampled[0]:g} has no completions",
                              where=f"{source}: completions.alphas",
                              fix=f"add {unsampled[0]:g} to completions.alphas or drop it from decision.alphas")
        batch_size = data.get("batch_size", "auto")
        if batch_size != "auto" and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                     or batch_size < 1):
            raise ConfigError(f"batch_size {batch_size!r} is invalid", where=f"{source}: batch_size",
                              fix="use a positive integer or auto")
        ctrl_opts = data.get("control_options") or {}
        if not isinstance(ctrl_opts, Mapping):
            raise ConfigError("`control_options` must be a mapping", where=f"{source}: control_options",
                              fix="e.g. control_options: {wrong_position: {offset: -1}}")
        for name, opts in ctrl_opts.items():
            if opts is not None and not isinstance(opts, Mapping):
                raise ConfigError(f"options for control {name!r} must be a mapping, got {opts!r}",
                                  where=f"{source}: control_options.{name}", fix="e.g. {offset: -1}")
        if battery_obj is None:
            battery_obj = Battery.from_yaml(resolve_battery(source, battery_name))
        inject = data.get("inject")
        if inject is not None:
            if not isinstance(inject, str):
                raise ConfigError(f"`inject` must be a position rule, got {inject!r}", where=f"{source}: inject",
                                  fix="e.g. inject: first_line_end")
            try:
                check_rule_syntax(inject)
            except ConfigError as exc:
                raise ConfigError(exc.message, where=f"{source}: inject", fix=exc.fix) from None
            battery_obj = attrs.evolve(battery_obj, prompts=tuple(attrs.evolve(p, inject=inject)
                                                                   for p in battery_obj.prompts))
        return cls(
            name=str(data.get("name") or Path(source).stem),
            model=model,
            layer=layer,
            battery_path=battery_name,
            battery=battery_obj,
            alphas=alphas,
            scalings=scalings,
            methods=tuple(methods),
            controls=tuple(controls),
            control_options={k: dict(v or {}) for k, v in ctrl_opts.items()},
            completions=completions,
            decision_alphas=decision_alphas,
            decision_level=level,
            decision_correction=correction,
            decision_min_effect=min_effect,
            decision_max_kl=max_kl,
            decision_random_draws=draws,
            seed=f.integer(data, "seed", default=0, minimum=0),
            batch_size=batch_size,
            single_token_families=bool(data.get("single_token_families", False)),
            source=source,
            raw=dict(data),
        )


_MODEL_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "id": ((str,), "a model id or directory, e.g. embedded:gemma-3-270m"),
    "dtype": ((str,), "auto, float32 or bfloat16"),
    "device": ((str,), "cpu, cuda, cuda:0, mps or auto"),
    "device_map": ((str, type(None)), "auto, or leave it out"),
    "revision": ((str, type(None)), "a branch, tag or commit, or leave it out"),
    "trust_remote_code": ((bool,), "true or false (no quotes); leave it out to keep it off"),
    "chat_template": ((bool,), "true or false (no quotes)"),
}


def _check_model_fields(model_raw: Mapping[str, Any], source: str) -> None:
    """Type-check the model section: ``trust_remote_code: "no"`` must not turn remote code ON."""
    for key, value in model_raw.items():
        types, fix = _MODEL_TYPES[key]
        if isinstance(value, bool) and bool not in types:
            ok = False
        else:
            ok = isinstance(value, types)
        if not ok or (key == "id" and not value.strip()):
            raise ConfigError(f"model.{key} has the wrong type or value ({value!r})",
                              where=f"{source}: model.{key}", fix=f"write {fix}")


class _Fields:
    """Typed field readers that name the file and field in their errors."""

    def __init__(self, source: str, prefix: str = ""):
        self.source = source
        self.prefix = prefix

    def _where(self, key: str) -> str:
        return f"{self.source}: {self.prefix}{key}"

    def integer(self, data: Mapping[str, Any], key: str, *, default: int | None = None,
                required: bool = False, minimum: int | None = None) -> int:
        if key not in data:
            if required:
                raise ConfigError(f"`{key}` is missing", where=self._where(key), fix=f"set {key}")
            assert default is not None
            return default
        v = data[key]
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"`{key}` must be an integer, got {v!r}", where=self._where(key),
                              fix="write a whole number")
        if minimum is not None and v < minimum:
            raise ConfigError(f"`{key}` must be >= {minimum}, got {v}", where=self._where(key),
                              fix=f"use a value >= {minimum}")
        return v

    def number(self, data: Mapping[str, Any], key: str, *, default: float,
               minimum: float | None = None) -> float:
        v = data.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"`{key}` must be a finite number, got {v!r}", where=self._where(key),
                              fix="write a number such as 1.0")
        if minimum is not None and v < minimum:
            raise ConfigError(f"`{key}` must be >= {minimum}", where=self._where(key),
                              fix=f"use a value >= {minimum}")
        return float(v)

    def numbers(self, data: Mapping[str, Any], key: str, *, default: Sequence[float]) -> tuple[float, ...]:
        v = data.get(key, list(default))
        if not isinstance(v, list) or not v:
            raise ConfigError(f"`{key}` must be a non-empty list of numbers", where=self._where(key),
                              fix="e.g. [-2, -1, 0, 1, 2, 4, 8]")
        out = []
        for x in v:
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise ConfigError(f"`{key}` holds a non-numeric value {x!r}", where=self._where(key),
                                  fix="use finite numbers only, e.g. 2 or -0.5")
            out.append(float(x))
        if len(set(out)) != len(out):
            raise ConfigError(f"`{key}` repeats a value", where=self._where(key), fix="list each value once")
        return tuple(out)


__all__ = ["COMPLETION_KEYS", "DECISION_KEYS", "EXPERIMENT_KEYS", "METHOD_KEYS", "MODEL_KEYS", "CompletionSpec",
           "Experiment", "MethodSpec", "ModelSpec", "is_embedded"]
