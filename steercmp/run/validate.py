"""Everything about an experiment that can be checked before a model loads.

:func:`validate_experiment` instantiates the configured methods and controls (each validating
its own options) and checks the model source and layer; ``steercmp run`` and ``steercmp plan``
both call it, so a config that plans is a config that runs. :func:`preflight` adds the
tokenizer-level checks (family words, position rules) with the tokenizer alone.
"""

from __future__ import annotations

import attrs

from steercmp.api import TARGET_CONDITION, UNRELATED_CONDITION, Control, Method
from steercmp.catalog import known_layer_count
from steercmp.config import Experiment
from steercmp.errors import ConfigError, PluginError, SteercmpError
from steercmp.lm.load import check_model_source, load_tokenizer
from steercmp.lm.prompts import TokenizedPrompt, tokenize_battery
from steercmp.plugin_manager import PluginSet


@attrs.frozen
class Validated:
    """The experiment's methods and controls, instantiated and validated (config order)."""

    methods: dict[str, Method]
    controls: dict[str, Control]


def in_file(exc: SteercmpError, source: str, field: str) -> SteercmpError:
    """A plugin's error with the experiment file and field in front (the user edits that file)."""
    where = exc.where or ""
    if source in where:
        return exc
    where = f"{source}: {where}" if where.startswith(("methods", "control_options")) else \
        f"{source}: {field}" + (f" ({where})" if where else "")
    return type(exc)(exc.message, where=where, fix=exc.fix)


def validate_experiment(exp: Experiment, plugins: PluginSet) -> Validated:
    """Instantiate and validate every method and control; check the model source and layer."""
    methods: dict[str, Method] = {}
    for spec in exp.methods:
        if spec.name not in plugins.methods:
            raise ConfigError(f"unknown method {spec.name!r}", where=f"{exp.source}: methods",
                              fix=f"use one of {', '.join(sorted(plugins.methods)) or 'none loaded'}"
                                  " (see `steercmp plugins`)")
        cls = plugins.method(spec.name)
        try:
            method = cls(spec.options, exp.run_settings(spec.key))
            method.validate()
        except SteercmpError as exc:
            raise in_file(exc, exp.source, f"methods.{spec.key}.options") from None
        except Exception as exc:
            raise PluginError(f"method {spec.name!r} rejected its options: {type(exc).__name__}: {exc}",
                              where=f"{exp.source}: methods.{spec.key}.options",
                              fix="check the method's documented options") from exc
        methods[spec.key] = method
    controls: dict[str, Control] = {}
    for name in exp.controls:
        if name in (TARGET_CONDITION, UNRELATED_CONDITION):
            continue
        if name not in plugins.controls:
            raise ConfigError(f"unknown control {name!r}", where=f"{exp.source}: controls",
                              fix=f"use one of {', '.join(sorted(plugins.controls))}")
        try:
            controls[name] = plugins.control(name)(exp.control_options.get(name, {}))
        except SteercmpError as exc:
            raise in_file(exc, exp.source, f"control_options.{name}") from None
    unknown_opts = sorted(set(exp.control_options) - set(exp.controls))
    if unknown_opts:
        raise ConfigError(f"control_options names {unknown_opts[0]!r}, which is not in `controls`",
                          where=f"{exp.source}: control_options.{unknown_opts[0]}",
                          fix="add it to `controls` or remove its options")
    check_model_source(exp.model.id, where=f"{exp.source}: model.id")
    n_layers = known_layer_count(exp.model.id)
    if n_layers is not None and not 0 <= exp.layer < n_layers:
        raise ConfigError(f"layer {exp.layer} is out of range for {exp.model.id} ({n_layers} blocks)",
                          where=f"{exp.source}: layer", fix=f"use 0..{n_layers - 1}")
    return Validated(methods=methods, controls=controls)


def preflight(exp: Experiment) -> dict[str, TokenizedPrompt]:
    """Tokenizer checks (family words, position rules) with the tokenizer only: no model loads
    and nothing is written until the battery passes. Returns each prompt tokenized as the run
    reads it, so later stages do not tokenize it again."""
    spec = exp.model
    tokenizer = load_tokenizer(spec.id, revision=spec.revision, trust_remote_code=spec.trust_remote_code,
                               where=f"{exp.source}: model.id")
    return tokenize_battery(exp.battery, tokenizer, chat_template=spec.chat_template,
                            require_single_token=exp.single_token_families)
