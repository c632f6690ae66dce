"""The one model catalogue: sizes of the models steercmp knows without downloading anything.

``steercmp plan``, config validation, the NLA plugin (AV/AR sizes) and the SAE plugin (expected
SAE width) all read this table, so a model's layer count, width and parameter count are written
once. Pure data and JSON: no torch, so every layer may import it.
"""

from __future__ import annotations

import json
from pathlib import Path

import attrs

#: the embedded default: the real Gemma 3 270M shipped on PyPI (see :mod:`steercmp.lm.embedded`)
EMBEDDED_ID = "embedded:gemma-3-270m"
EMBEDDED_ALIASES = frozenset({EMBEDDED_ID, "gemma-3-270m", "embedded"})
#: bytes per parameter of each dtype spelling a config accepts
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


@attrs.frozen
class ModelInfo:
    """Decoder blocks, residual width, parameter count and vocabulary size of one model."""

    layers: int | None
    d_model: int | None
    params: int | None
    vocab: int | None = None


_GEMMA3 = {
    "270m": ModelInfo(18, 640, 268_098_176, 262_144),
    "1b": ModelInfo(26, 1152, 999_885_952, 262_144),
    "4b": ModelInfo(34, 2560, 4_300_079_472, 262_208),
    "12b": ModelInfo(48, 3840, 12_187_325_040, 262_208),
    "27b": ModelInfo(62, 5376, 27_432_406_640, 262_208),
}

#: Hugging Face id -> size. The instruction and pretrained variants share a shape.
MODELS: dict[str, ModelInfo] = {
    EMBEDDED_ID: _GEMMA3["270m"],
    **{f"google/gemma-3-{size}-{kind}": info for size, info in _GEMMA3.items()
       for kind in ("pt", "it")},
    "google/gemma-3-270m": _GEMMA3["270m"],
    "Qwen/Qwen2.5-7B-Instruct": ModelInfo(28, 3584, 7_615_616_512, 152_064),
    "meta-llama/Llama-3.3-70B-Instruct": ModelInfo(80, 8192, 70_553_706_496, 128_256),
}

#: released NLA pairs (the prefix of ``-av`` / ``-ar`` ids) -> (base model id, extraction layer)
NLA_PAIRS: dict[str, tuple[str, int]] = {
    "kitft/nla-gemma3-12b-L32": ("google/gemma-3-12b-it", 32),
    "kitft/nla-gemma3-27b-L41": ("google/gemma-3-27b-it", 41),
    "kitft/nla-qwen2.5-7b-L20": ("Qwen/Qwen2.5-7B-Instruct", 20),
    "kitft/Llama-3.3-70B-NLA-L53": ("meta-llama/Llama-3.3-70B-Instruct", 53),
}


def is_embedded(model_id: str) -> bool:
    """Whether ``model_id`` names the embedded default."""
    return model_id in EMBEDDED_ALIASES


def known_model(model_id: str) -> ModelInfo | None:
    """A model's size from the table, or from a local directory's ``config.json``."""
    if is_embedded(model_id):
        return MODELS[EMBEDDED_ID]
    if model_id in MODELS:
        return MODELS[model_id]
    cfg_path = Path(model_id).expanduser() / "config.json"
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return None
    text = cfg.get("text_config", cfg) if isinstance(cfg, dict) else {}
    layers, d = text.get("num_hidden_layers"), text.get("hidden_size")
    params = None
    if layers and d:
        inter = text.get("intermediate_size", 4 * d)
        params = layers * (4 * d * d + 3 * d * inter) + text.get("vocab_size", 0) * d
    return ModelInfo(layers, d, params, text.get("vocab_size"))


def known_layer_count(model_id: str) -> int | None:
    info = known_model(model_id)
    return None if info is None else info.layers


def nla_pair(source: str) -> tuple[str, int] | None:
    """(base model id, layer) of a released NLA AV or AR id, or ``None``."""
    for prefix, pair in NLA_PAIRS.items():
        if source == prefix or source.removesuffix("-av").removesuffix("-ar") == prefix:
            return pair
    return None


__all__ = ["DTYPE_BYTES", "EMBEDDED_ALIASES", "EMBEDDED_ID", "MODELS", "ModelInfo", "NLA_PAIRS",
           "is_embedded", "known_layer_count", "known_model", "nla_pair"]
