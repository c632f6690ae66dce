"""One place for the KV-cache spelling of the installed transformers.

transformers 5.x renamed a forward's ``past_key_values`` argument and output to ``cache`` and warns
on the old name (removed in 5.40). steercmp supports the whole 5.x range, so it asks the model
which spelling its forward takes instead of assuming either.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from steercmp.lm.layout import text_config


@functools.lru_cache(maxsize=32)
def _cache_argument(forward_owner: type) -> str:
    params = inspect.signature(forward_owner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """``{"cache": cache}`` or ``{"past_key_values": cache}``, whichever ``model.forward`` takes."""
    return {_cache_argument(type(model)): cache}


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned, under either name (``None`` when it returned none)."""
    fields = getattr(type(output), "__dataclass_fields__", {})
    return getattr(output, "cache" if "cache" in fields else "past_key_values", None)


def pad_cache_layers(cache: Any, which: Any, length: int, like: torch.Tensor, config: Any) -> None:
    """Give the cache layers ``which`` (blocks a partial pass never ran) zero keys and values up to
    ``length`` positions: never read, but the model's mask and position bookkeeping (read from
    layer 0 and from the first full-attention layer) then sees the true sequence length."""
    layers = cache.layers
    ref = next((lay.keys for lay in layers if getattr(lay, "is_initialized", False)
                and lay.get_seq_length() > 0), None)
    cfg = text_config(config)
    heads = ref.shape[1] if ref is not None else cfg.num_key_value_heads
    head_dim = ref.shape[3] if ref is not None else (getattr(cfg, "head_dim", None)
                                                     or cfg.hidden_size // cfg.num_attention_heads)
    for i in which:
        have = layers[i].get_seq_length()
        if have < length:
            zeros = like.new_zeros(like.shape[0], heads, length - have, head_dim)
            layers[i].update(zeros, zeros)


__all__ = ["cache_kwargs", "output_cache", "pad_cache_layers"]
