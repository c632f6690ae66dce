"""Content hashes and seeds: the ground floor every layer may use.

Every random choice in steercmp derives from the run seed and a row's identity, never from call
order, so batching, sharding and resuming cannot change a result.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch


def stable_hash(obj: Any, n: int = 16) -> str:
    """A short sha256 of a JSON-serialisable object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def derive_seed(*key: object) -> int:
    """A 63-bit seed from the run seed and a row identity (never from call order)."""
    digest = hashlib.sha256("|".join(map(str, key)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_generator(*key: object) -> torch.Generator:
    """A CPU generator seeded by :func:`derive_seed` of ``key``."""
    g = torch.Generator()
    g.manual_seed(derive_seed(*key))
    return g


__all__ = ["derive_seed", "make_generator", "stable_hash"]
