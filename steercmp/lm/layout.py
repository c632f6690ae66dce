"""Where a model keeps its parts: the text decoder blocks and the text config.

Layer convention (shared with NLA checkpoints, sae-lens and Gemma Scope 2): "layer K" is the
OUTPUT of decoder block K, 0-indexed = ``hidden_states[K+1]`` = ``blocks.K.hook_resid_post``.
"""

from __future__ import annotations

from typing import Any

import torch

from steercmp.errors import ConfigError


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The text decoder blocks of a causal LM or of Gemma 3's multimodal wrapper."""
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        dec = get_decoder()
        layers = getattr(dec, "layers", None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
        lm = getattr(dec, "language_model", None)
        if lm is not None and isinstance(getattr(lm, "layers", None), torch.nn.ModuleList):
            return lm.layers
    for path in ("model.layers", "model.language_model.layers", "model.model.language_model.layers",
                 "language_model.model.layers"):
        obj: Any = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise ConfigError(
        f"cannot find the text decoder blocks of {type(model).__name__}",
        fix="use a Gemma 3 / Llama-style causal LM or add its layout to steercmp.lm.load.decoder_layers",
    )


def text_config(config: Any) -> Any:
    """The text config of a model config (Gemma 3 12B nests it under ``text_config``)."""
    return getattr(config, "text_config", None) or config
