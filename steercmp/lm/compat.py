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


__all__ = ["cache_kwargs", "output_cache"]
