"""``nla_meta.yaml``: the sidecar that pins an NLA checkpoint's templates, token ids and scales.

The sidecar is the inference contract. Nothing here hard-codes a token id, a template or a scale:
everything is read from the sidecar and then asserted against the live tokenizer
(:mod:`steercmp_plugins.nla.av` / :mod:`.ar`). Both key spellings seen in the official code are
accepted: released sidecars say ``role: av | ar`` and ``prompt_templates.av | ar``; training-time
sidecars say ``actor | critic``. The extraction layer may sit at the top level
(``extraction_layer_index``), under ``critic`` / ``actor`` / ``extraction``, or only as the AR's
``ar.num_hidden_layers`` (= K).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import yaml

from steercmp.api import ConfigError

SIDECAR_NAME = "nla_meta.yaml"
VALUE_HEAD_NAME = "value_head.safetensors"
SCALE_SQRT_D = "sqrt_d_model"
DEFAULT_AR_TEMPLATE = "Summary of the following text: <text>{explanation}</text> <summary>"

_ROLE_ALIASES = {"av": "av", "actor": "av", "ar": "ar", "critic": "ar"}
_TEMPLATE_KEYS = {"av": ("av", "actor"), "ar": ("ar", "critic")}


def _get(d: Mapping[str, Any] | None, *path: str) -> Any:
    obj: Any = d
    for part in path:
        if not isinstance(obj, Mapping) or part not in obj:
            return None
        obj = obj[part]
    return obj


def resolve_scale(raw: Any, d_model: int, field: str, where: str) -> float | None:
    """A sidecar scale: a number, ``"sqrt_d_model"``, or ``None`` / ``"raw"`` (no rescaling)."""
    if raw is None or raw in ("raw", "none"):
        return None
    if raw == SCALE_SQRT_D:
        return math.sqrt(d_model)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{field} must be a number, 'sqrt_d_model' or null, got {raw!r}",
                          where=where, fix="correct the sidecar") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{field} must be a positive number, got {raw!r}", where=where,
                          fix="correct the sidecar")
    return value


def _int_or_none(raw: Any, field: str, where: str) -> int | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise ConfigError(f"{field} must be an integer, got {raw!r}", where=where,
                          fix="correct the sidecar")
    return raw


@attrs.frozen
class NlaMeta:
    """The validated sidecar of one NLA checkpoint (AV or AR)."""

    role: str
    d_model: int
    template: str
    extraction_layer: int | None
    injection_scale: float | None = None
    mse_scale: float | None = None
    injection_char: str | None = None
    injection_token_id: int | None = None
    left_neighbor_id: int | None = None
    right_neighbor_id: int | None = None
    critic_suffix_ids: tuple[int, ...] | None = None
    ar_num_hidden_layers: int | None = None
    base_model: str | None = None
    path: str = "<sidecar>"
    raw: Mapping[str, Any] = attrs.field(factory=dict, repr=False)

    @classmethod
    def from_yaml(cls, path: str | Path) -> NlaMeta:
        path = Path(path)
        if path.is_dir():
            path = path / SIDECAR_NAME
        if not path.exists():
            raise ConfigError(f"no {SIDECAR_NAME} in {str(path.parent)!r}", where=str(path),
                              fix="point at an NLA checkpoint directory (config.json, weights, "
                                  "tokenizer, nla_meta.yaml)")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"invalid YAML: {exc}", where=str(path),
                              fix="repair the sidecar") from None
        return cls.from_dict(data, where=str(path))

    @classmethod
    def from_dict(cls, data: Any, where: str = "<sidecar>", *, expect_role: str | None = None
                  ) -> NlaMeta:
        """Validate a sidecar (any of the release's spellings); each part has its reader below."""
        if not isinstance(data, Mapping):
            raise ConfigError("the sidecar is not a mapping", where=where,
                              fix="write nla_meta.yaml as a YAML mapping")
        kind = data.get("kind")
        if kind is not None and kind != "nla_model":
            raise ConfigError(f"kind is {kind!r}, expected 'nla_model'", where=f"{where}: kind",
                              fix="point at a model checkpoint, not a dataset sidecar")
        role = _read_role(data, where, expect_role)
        d_model = data.get("d_model")
        if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model <= 0:
            raise ConfigError(f"d_model must be a positive integer, got {d_model!r}",
                              where=f"{where}: d_model", fix="correct the sidecar")
        template = _read_template(data, role, where)
        layer, ar_k = _read_layers(data, role, where)
        injection_scale, mse_scale = _read_scales(data, role, d_model, where)
        inj_char, inj_id, left, right, suffix = _read_tokens(data, role, where)
        base = data.get("base_model") or _get(data, "model", "base")
        return cls(role=role, d_model=d_model, template=template, extraction_layer=layer,
                   injection_scale=injection_scale, mse_scale=mse_scale,
                   injection_char=inj_char, injection_token_id=inj_id, left_neighbor_id=left,
                   right_neighbor_id=right, critic_suffix_ids=suffix, ar_num_hidden_layers=ar_k,
                   base_model=str(base) if base else None, path=where, raw=dict(data))

    def field_where(self, field: str) -> str:
        return f"{self.path}: {field}"

    def check_compatible(self, *, d_model: int | None = None, layer: int | None = None) -> None:
        """Assert the checkpoint against the base model's hidden size and the experiment layer."""
        if d_model is not None and d_model != self.d_model:
            raise ConfigError(f"sidecar d_model {self.d_model} != base model hidden size {d_model}",
                              where=self.field_where("d_model"),
                              fix="use the NLA pair trained for this base model")
        if layer is not None and self.extraction_layer is not None and layer != self.extraction_layer:
            raise ConfigError(f"the NLA was trained on layer {self.extraction_layer} but the "
                              f"experiment uses layer {layer}",
                              where=self.field_where("extraction_layer_index"),
                              fix=f"set the experiment's layer to {self.extraction_layer} or use "
                                  "a pair trained on that layer")


def _read_role(data: Mapping[str, Any], where: str, expect_role: str | None) -> str:
    """``av`` or ``ar`` (the release's actor/critic spellings accepted); checked against ``expect_role``."""
    role_raw = data.get("role")
    role = _ROLE_ALIASES.get(str(role_raw).lower()) if role_raw is not None else None
    if role is None:
        raise ConfigError(f"role is {role_raw!r}", where=f"{where}: role",
                          fix="set role to av|actor or ar|critic")
    if expect_role is not None and role != expect_role:
        raise ConfigError(f"role is {role_raw!r} but an {expect_role.upper()} was expected",
                          where=f"{where}: role",
                          fix=f"pass the {expect_role.upper()} checkpoint here")
    return role


def _read_template(data: Mapping[str, Any], role: str, where: str) -> str:
    """The role's prompt template (an AR without templates gets the release's default)."""
    templates = data.get("prompt_templates") or {}
    template = None
    for key in _TEMPLATE_KEYS[role]:
        if isinstance(_get(templates, key), str):
            template = templates[key]
            break
    if template is None and role == "ar":
        template = DEFAULT_AR_TEMPLATE if not templates else None
    if template is None:
        keys = " or ".join(f"prompt_templates.{k}" for k in _TEMPLATE_KEYS[role])
        raise ConfigError(f"missing {keys}", where=f"{where}: prompt_templates",
                          fix="add the prompt template the checkpoint was trained with")
    placeholder = "{injection_char}" if role == "av" else "{explanation}"
    if placeholder not in template:
        raise ConfigError(f"the {role.upper()} template lacks {placeholder}",
                          where=f"{where}: prompt_templates.{role}",
                          fix=f"put {placeholder} where it belongs in the template")
    return template


def _read_layers(data: Mapping[str, Any], role: str, where: str) -> tuple[int | None, int | None]:
    """``(extraction layer, AR backbone depth K)``: every spelling of the layer must agree, and an
    AR's K is its extraction layer."""
    ar_k = _int_or_none(_get(data, "ar", "num_hidden_layers"), "ar.num_hidden_layers", where)
    if ar_k is None:
        ar_k = _int_or_none(_get(data, "critic", "num_hidden_layers"), "critic.num_hidden_layers", where)
    layer = None
    for path in (("extraction_layer_index",), ("critic", "extraction_layer_index"),
                 ("actor", "extraction_layer_index"), ("extraction", "layer_index"),
                 ("extraction", "extraction_layer_index")):
        value = _int_or_none(_get(data, *path), ".".join(path), where)
        if value is not None:
            if layer is not None and value != layer:
                raise ConfigError(f"{'.'.join(path)} = {value} disagrees with the extraction "
                                  f"layer {layer} given elsewhere", where=where,
                                  fix="make the sidecar consistent")
            layer = value
    if layer is None:
        layer = ar_k
    if role == "ar" and ar_k is not None and layer is not None and ar_k != layer:
        raise ConfigError(f"ar.num_hidden_layers = {ar_k} but the extraction layer is {layer}",
                          where=f"{where}: ar.num_hidden_layers",
                          fix="the sidecar stores K (config.json has K+1)")
    return layer, ar_k


def _read_scales(data: Mapping[str, Any], role: str, d_model: int, where: str) -> tuple[float | None, float | None]:
    """``(injection scale, mse scale)``: an AV must state its injection scale (read, never assumed)."""
    extraction = data.get("extraction") or {}
    scale_where = f"{where}: extraction"
    injection_scale = None
    if role == "av":
        if not isinstance(extraction, Mapping) or "injection_scale" not in extraction:
            raise ConfigError("extraction.injection_scale is missing from an AV sidecar",
                              where=f"{where}: extraction.injection_scale",
                              fix="state the L2 norm the AV's injected vectors were trained at "
                                  "(e.g. 80000 for Gemma-3-12B L32); scales are read, never assumed")
        injection_scale = resolve_scale(extraction["injection_scale"], d_model, "extraction.injection_scale",
                                        scale_where)
        if injection_scale is None:
            raise ConfigError("extraction.injection_scale is null in an AV sidecar",
                              where=f"{where}: extraction.injection_scale",
                              fix="an AV needs the L2 norm its injected vectors were scaled to")
    mse_scale = resolve_scale(extraction.get("mse_scale", SCALE_SQRT_D), d_model, "extraction.mse_scale",
                              scale_where)
    return injection_scale, mse_scale


def _read_tokens(data: Mapping[str, Any], role: str, where: str) -> tuple[Any, ...]:
    """``(injection char, its token id, left and right neighbour ids, critic suffix ids)``; an AV
    pins all four injection fields."""
    tokens = data.get("tokens") or {}
    inj_char = tokens.get("injection_char")
    inj_id = _int_or_none(tokens.get("injection_token_id"), "tokens.injection_token_id", where)
    left = _int_or_none(tokens.get("injection_left_neighbor_id"), "tokens.injection_left_neighbor_id", where)
    right = _int_or_none(tokens.get("injection_right_neighbor_id"), "tokens.injection_right_neighbor_id", where)
    if role == "av":
        for field, value in (("tokens.injection_char", inj_char), ("tokens.injection_token_id", inj_id),
                             ("tokens.injection_left_neighbor_id", left),
                             ("tokens.injection_right_neighbor_id", right)):
            if value is None:
                raise ConfigError(f"missing {field}", where=f"{where}: {field}",
                                  fix="an AV sidecar pins the injection token and neighbours")
        if not isinstance(inj_char, str) or len(inj_char) == 0:
            raise ConfigError(f"tokens.injection_char must be a string, got {inj_char!r}",
                              where=f"{where}: tokens.injection_char", fix="correct the sidecar")
    suffix_raw = tokens.get("critic_suffix_ids")
    suffix = None
    if suffix_raw is not None:
        if not (isinstance(suffix_raw, list) and suffix_raw
                and all(isinstance(x, int) and not isinstance(x, bool) for x in suffix_raw)):
            raise ConfigError(f"tokens.critic_suffix_ids must be a non-empty list of ints, "
                              f"got {suffix_raw!r}", where=f"{where}: tokens.critic_suffix_ids",
                              fix="correct the sidecar")
        suffix = tuple(suffix_raw)
    return inj_char, inj_id, left, right, suffix
