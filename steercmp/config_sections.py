"""The experiment file's sections, each read and checked by one reader (a SAELens-style
per-section config): the section's spec class, its accepted keys and its reader. One shared
unknown-key check names the file, the field and the valid keys. :mod:`steercmp.config` assembles
the :class:`~steercmp.config.Experiment` from them."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from steercmp.api import SCALINGS
from steercmp.battery import Battery, check_rule_syntax
from steercmp.catalog import DTYPE_BYTES, EMBEDDED_ID
from steercmp.decision_settings import check_correction, check_level, matched_settings
from steercmp.errors import ConfigError

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
    #: prompts whose unsteered rows are sampled in one batch: consecutive blocks of the battery,
    #: fixed by it (``steercmp.run.keys.sample_groups``; shards are cut between them)
    prompt_group: int = 4


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



def check_keys(section: Mapping[str, Any], allowed: frozenset[str], where: str, noun: str = "",
               hint: str = "") -> None:
    """The one unknown-key check: the first key of ``section`` not in ``allowed`` is an error at
    ``where`` + key (e.g. ``file.yaml: model.``), listing the valid keys."""
    bad = sorted(set(section) - allowed, key=str)
    if bad:
        raise ConfigError(f"unknown {noun + ' ' if noun else ''}key {bad[0]!r}", where=f"{where}{bad[0]}",
                          fix=f"valid keys are {', '.join(sorted(allowed))}{hint}")


def read_model(raw: Any, source: str) -> ModelSpec:
    """The ``model`` section (a mapping, or an id alone)."""
    if isinstance(raw, str):
        raw = {"id": raw}
    if not isinstance(raw, Mapping):
        raise ConfigError("`model` must be a mapping or an id", where=f"{source}: model",
                          fix="e.g. model: {id: embedded:gemma-3-270m}")
    check_keys(raw, MODEL_KEYS, f"{source}: model.", "model")
    check_model_fields(raw, source)
    model = ModelSpec(**dict(raw))
    if model.dtype not in ("auto", *DTYPE_BYTES):
        raise ConfigError(f"unknown dtype {model.dtype!r}", where=f"{source}: model.dtype",
                          fix="use auto (measured per machine), float32 or bfloat16")
    return model


def read_battery_name(raw: Any, source: str, shipped: str) -> str:
    """The ``battery`` key: a shipped name or a path (``shipped`` lists the names for the fix)."""
    if not isinstance(raw, str) or not raw.strip():
        problem = "`battery` is missing" if raw is None else f"`battery` must be a name or path, got {raw!r}"
        raise ConfigError(problem, where=f"{source}: battery",
                          fix=f"name a shipped battery ({shipped}) or a battery YAML file")
    return raw


def read_scalings(raw: Any, source: str) -> tuple[str, ...]:
    """The ``scalings`` list (a single name is accepted)."""
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not all(isinstance(s, str) for s in raw):
        raise ConfigError(f"`scalings` must be a list of names, got {raw!r}", where=f"{source}: scalings",
                          fix=f"e.g. scalings: [raw] (names: {', '.join(SCALINGS)})")
    scalings = tuple(raw)
    if len(set(scalings)) != len(scalings):
        raise ConfigError("`scalings` repeats a name", where=f"{source}: scalings", fix="list each scaling once")
    for s in scalings:
        if s not in SCALINGS:
            raise ConfigError(f"unknown scaling {s!r}", where=f"{source}: scalings",
                              fix=f"use {' or '.join(SCALINGS)}")
    if not scalings:
        raise ConfigError("`scalings` is empty", where=f"{source}: scalings", fix="use [raw]")
    return scalings


def read_methods(raw: Any, source: str) -> tuple[MethodSpec, ...]:
    """The ``methods`` list: names or ``{name, options, label}`` entries, each key unique."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError("`methods` must be a non-empty list", where=f"{source}: methods",
                          fix="e.g. methods: [{name: unembed_direction}]")
    methods: list[MethodSpec] = []
    for i, m in enumerate(raw):
        if isinstance(m, str):
            m = {"name": m}
        if not isinstance(m, Mapping) or not isinstance(m.get("name"), str):
            raise ConfigError("each method needs a `name`", where=f"{source}: methods[{i}]",
                              fix="e.g. {name: nla_text_edit, options: {...}}")
        check_keys(m, METHOD_KEYS, f"{source}: methods[{i}].", "method", "; method options go under `options`")
        opts = m.get("options") or {}
        if not isinstance(opts, Mapping):
            raise ConfigError("`options` must be a mapping", where=f"{source}: methods[{i}].options",
                              fix="write options as key: value pairs")
        label = m.get("label")
        if label is not None and (not isinstance(label, str) or not label):
            raise ConfigError(f"label {label!r} must be a non-empty string",
                              where=f"{source}: methods[{i}].label", fix="e.g. label: unembed_small")
        methods.append(MethodSpec(name=m["name"], options=dict(opts), label=label))
    keys = [m.key for m in methods]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup:
        raise ConfigError(f"method {dup!r} is listed twice", where=f"{source}: methods",
                          fix="give the second one a distinct `label`")
    return tuple(methods)


def read_controls(data: Mapping[str, Any], source: str) -> tuple[tuple[str, ...], dict[str, dict[str, Any]]]:
    """``(controls, control_options)``: the control names and each control's options."""
    controls = data.get("controls", list(DEFAULT_CONTROLS))
    if not isinstance(controls, list) or not all(isinstance(c, str) for c in controls):
        raise ConfigError("`controls` must be a list of names", where=f"{source}: controls",
                          fix="e.g. controls: [noop, random_delta, wrong_position]")
    options = data.get("control_options") or {}
    if not isinstance(options, Mapping):
        raise ConfigError("`control_options` must be a mapping", where=f"{source}: control_options",
                          fix="e.g. control_options: {wrong_position: {offset: -1}}")
    for name, opts in options.items():
        if opts is not None and not isinstance(opts, Mapping):
            raise ConfigError(f"options for control {name!r} must be a mapping, got {opts!r}",
                              where=f"{source}: control_options.{name}", fix="e.g. {offset: -1}")
    return tuple(controls), {k: dict(v or {}) for k, v in options.items()}


def check_scalar_fields(data: Mapping[str, Any], source: str) -> None:
    """The top-level scalars without a section: ``single_token_families``, ``name``, ``description``."""
    if "single_token_families" in data and not isinstance(data["single_token_families"], bool):
        raise ConfigError(f"`single_token_families` must be true or false, got {data['single_token_families']!r}",
                          where=f"{source}: single_token_families", fix="write true or false (no quotes)")
    if "name" in data and (not isinstance(data["name"], str) or not data["name"].strip()):
        raise ConfigError(f"`name` must be a non-empty string, got {data['name']!r}",
                          where=f"{source}: name", fix="e.g. name: note8-270m")
    if data.get("description") is not None and not isinstance(data["description"], str):
        raise ConfigError(f"`description` must be text, got {data['description']!r}",
                          where=f"{source}: description", fix="quote it, e.g. description: \"...\"")


def read_completions(raw: Any, source: str) -> CompletionSpec:
    """The ``completions`` section."""
    raw = raw or {}
    if not isinstance(raw, Mapping):
        raise ConfigError("`completions` must be a mapping", where=f"{source}: completions",
                          fix="e.g. completions: {seeds: 5, alphas: [0, 2]}")
    check_keys(raw, COMPLETION_KEYS, f"{source}: completions.", "completions")
    f = Fields(source, prefix="completions.")
    if not isinstance(raw.get("enabled", True), bool):
        raise ConfigError(f"`enabled` must be true or false, got {raw['enabled']!r}",
                          where=f"{source}: completions.enabled", fix="write true or false (no quotes)")
    return CompletionSpec(
        enabled=bool(raw.get("enabled", True)),
        seeds=f.integer(raw, "seeds", default=5, minimum=1),
        alphas=f.numbers(raw, "alphas", default=(0, 2)),
        max_new_tokens=f.integer(raw, "max_new_tokens", default=10, minimum=1),
        temperature=f.number(raw, "temperature", default=1.0, minimum=0.0),
        top_p=f.number(raw, "top_p", default=1.0, minimum=0.0),
        prompt_group=f.integer(raw, "prompt_group", default=4, minimum=1),
    )


def read_decision(raw: Any, source: str, alphas: Sequence[float], completions: CompletionSpec) -> dict[str, Any]:
    """The ``decision`` section, as the :class:`~steercmp.config.Experiment` fields it sets
    (``decision_alphas``, ``decision_level``, ...); its alphas must be swept and sampled."""
    raw = raw or {}
    if not isinstance(raw, Mapping):
        raise ConfigError("`decision` must be a mapping", where=f"{source}: decision",
                          fix="e.g. decision: {alphas: [2]}")
    check_keys(raw, DECISION_KEYS, f"{source}: decision.", "decision")
    decision_alphas = Fields(source, prefix="decision.").numbers(raw, "alphas", default=(2,))
    level = check_level(raw.get("level", 0.05), where=f"{source}: decision.level")
    correction = check_correction(raw.get("correction", "none"), where=f"{source}: decision.correction")
    min_effect, max_kl, draws = matched_settings(raw, f"{source}: decision.")
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
    return {"decision_alphas": decision_alphas, "decision_level": level, "decision_correction": correction,
            "decision_min_effect": min_effect, "decision_max_kl": max_kl, "decision_random_draws": draws}


def read_batch_size(raw: Any, source: str) -> int | str:
    """``batch_size``: a positive integer or ``auto``."""
    if raw != "auto" and (isinstance(raw, bool) or not isinstance(raw, int) or raw < 1):
        raise ConfigError(f"batch_size {raw!r} is invalid", where=f"{source}: batch_size",
                          fix="use a positive integer or auto")
    return raw


def apply_inject(raw: Any, battery: Battery, source: str) -> Battery:
    """``inject``: one position rule for every prompt of ``battery`` (``None`` keeps each prompt's)."""
    if raw is None:
        return battery
    if not isinstance(raw, str):
        raise ConfigError(f"`inject` must be a position rule, got {raw!r}", where=f"{source}: inject",
                          fix="e.g. inject: first_line_end")
    try:
        check_rule_syntax(raw)
    except ConfigError as exc:
        raise ConfigError(exc.message, where=f"{source}: inject", fix=exc.fix) from None
    return attrs.evolve(battery, prompts=tuple(attrs.evolve(p, inject=raw) for p in battery.prompts))


_MODEL_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "id": ((str,), "a model id or directory, e.g. embedded:gemma-3-270m"),
    "dtype": ((str,), "auto, float32 or bfloat16"),
    "device": ((str,), "cpu, cuda, cuda:0, mps or auto"),
    "device_map": ((str, type(None)), "auto, or leave it out"),
    "revision": ((str, type(None)), "a branch, tag or commit, or leave it out"),
    "trust_remote_code": ((bool,), "true or false (no quotes); leave it out to keep it off"),
    "chat_template": ((bool,), "true or false (no quotes)"),
}


def check_model_fields(model_raw: Mapping[str, Any], source: str) -> None:
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


class Fields:
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
