"""Experiment configuration: frozen attrs classes built from YAML, validated before models load."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import yaml

from steercmp.api import RunSettings
from steercmp.battery import Battery, read_yaml
from steercmp.battery_files import (
    _base_dir,
    _battery_file,
    _resolve,
    _shipped_list,
    resolve_battery,
)
from steercmp.catalog import is_embedded
from steercmp.config_sections import (
    COMPLETION_KEYS,
    DECISION_KEYS,
    DEFAULT_CONTROLS,
    EXPERIMENT_KEYS,
    METHOD_KEYS,
    MODEL_KEYS,
    RENAMED_KEYS,
    CompletionSpec,
    Fields,
    MethodSpec,
    ModelSpec,
    apply_inject,
    check_keys,
    check_scalar_fields,
    read_batch_size,
    read_battery_name,
    read_completions,
    read_controls,
    read_decision,
    read_methods,
    read_model,
    read_scalings,
)
from steercmp.decision_settings import DEFAULT_MIN_EFFECT, DEFAULT_RANDOM_DRAWS
from steercmp.errors import ConfigError
from steercmp.redact import redact


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
        ``source``'s folder; ``battery`` supplies an in-memory battery instead (tests, the kit).
        Each section has its reader in :mod:`steercmp.config_sections`."""
        if not isinstance(data, Mapping):
            raise ConfigError("an experiment must be a YAML mapping", where=source,
                              fix="see experiments/embedded.yaml")
        for old, (new, fix) in RENAMED_KEYS.items():
            if old in data:
                raise ConfigError(f"`{old}` is not a key (the key is `{new}`)", where=f"{source}: {old}", fix=fix)
        check_keys(data, EXPERIMENT_KEYS, f"{source}: ")
        f = Fields(source)
        model = read_model(data.get("model", {}), source)
        layer = f.integer(data, "layer", required=True, minimum=0)
        battery_name = read_battery_name(data.get("battery"), source, _shipped_list())
        alphas = f.numbers(data, "alphas", default=(-2, -1, 0, 1, 2, 4, 8))
        scalings = read_scalings(data.get("scalings", ["raw"]), source)
        methods = read_methods(data.get("methods"), source)
        controls, control_options = read_controls(data, source)
        check_scalar_fields(data, source)
        completions = read_completions(data.get("completions"), source)
        decision = read_decision(data.get("decision"), source, alphas, completions)
        batch_size = read_batch_size(data.get("batch_size", "auto"), source)
        battery = battery if battery is not None else Battery.from_yaml(resolve_battery(source, battery_name))
        return cls(
            name=str(data.get("name") or Path(source).stem), model=model, layer=layer,
            battery_path=battery_name, battery=apply_inject(data.get("inject"), battery, source),
            alphas=alphas, scalings=scalings, methods=methods, controls=controls,
            control_options=control_options, completions=completions, **decision,
            seed=f.integer(data, "seed", default=0, minimum=0), batch_size=batch_size,
            single_token_families=bool(data.get("single_token_families", False)),
            source=source, raw=dict(data),
        )


__all__ = ["COMPLETION_KEYS", "DECISION_KEYS", "EXPERIMENT_KEYS", "METHOD_KEYS", "MODEL_KEYS", "CompletionSpec",
           "Experiment", "MethodSpec", "ModelSpec", "is_embedded"]
