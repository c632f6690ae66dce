"""The dtype a machine runs fastest, chosen by a measured probe, never by assumption.

On a CPU with native bf16 (AVX512-BF16 or AMX) a bfloat16 matmul is 2-3x faster than float32; on
an AVX2-only CPU it is 7x to 400x SLOWER (a 2-core Zen 1 EPYC: 27 ms against 10.8 s). ``dtype:
auto`` therefore times a short float32 and bfloat16 matmul once per machine (cached under the
steercmp cache, keyed by CPU capability, processor, torch version and thread count) and picks
bfloat16 only when it is clearly faster; a bf16 call already far slower than float32 ends the
probe, so a cold start there pays one such call, not seven. On CUDA,
``auto`` is bfloat16 where the GPU supports it. ``STEERCMP_DTYPE=float32`` (or ``bfloat16``)
overrides the choice, e.g. to measure the float32 path on a bf16 machine.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from typing import Any

import torch

from steercmp.errors import ConfigError
from steercmp.lm.embedded import cache_root

FORCE_ENV = "STEERCMP_DTYPE"
AUTO = "auto"
#: bf16 must be at least this much faster than fp32 to be chosen (noise guard)
SPEEDUP_NEEDED = 1.25
PROBE_VERSION = 1
_SHAPE = (256, 2048, 2048)  # (rows, inner, cols): the size of a decoder block's matmuls
#: a bf16 call this many times slower than float32's best cannot turn into a win: stop timing
GIVE_UP_FACTOR = 10.0


def _probe_key() -> dict[str, Any]:
    return {"version": PROBE_VERSION, "capability": torch.backends.cpu.get_cpu_capability(),
            "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def _time_matmul(dtype: torch.dtype, reps: int = 6, give_up_after: float = math.inf) -> float:
    """The best of ``reps`` timed matmuls after a warm-up (kernel selection). A call, the warm-up
    included, slower than ``give_up_after`` seconds ends the timing and is returned as it is."""
    m, k, n = _SHAPE
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(k, n, generator=gen).to(dtype)
    best = float("inf")
    for rep in range(reps + 1):
        start = time.perf_counter()
        torch.matmul(a, b)
        elapsed = time.perf_counter() - start
        if elapsed > give_up_after:
            return elapsed
        if rep:  # rep 0 is the warm-up
            best = min(best, elapsed)
    return best


def probe_cpu() -> dict[str, Any]:
    """Time float32 and bfloat16 matmuls on this CPU (cached per machine); returns the record."""
    path = cache_root() / "dtype-probe.json"
    key = _probe_key()
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached
    except (OSError, ValueError):
        pass
    fp32 = _time_matmul(torch.float32)
    bf16 = _time_matmul(torch.bfloat16, give_up_after=GIVE_UP_FACTOR * fp32)
    record = {"key": key, "float32_seconds": fp32, "bfloat16_seconds": bf16, "speedup": fp32 / bf16,
              "choice": "bfloat16" if fp32 / bf16 >= SPEEDUP_NEEDED else "float32"}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2))
    except OSError:  # a read-only cache only costs a re-probe next time
        pass
    return record


def fast_dtype(device: str = "cpu") -> str:
    """``float32`` or ``bfloat16``: the forced choice, else what this device runs fastest."""
    forced = os.environ.get(FORCE_ENV)
    if forced:
        if forced not in ("float32", "bfloat16"):
            raise ConfigError(f"{FORCE_ENV}={forced!r} is not a dtype steercmp forces", where=FORCE_ENV,
                              fix="set it to float32 or bfloat16, or unset it")
        return forced
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    return str(probe_cpu()["choice"])


def resolve_dtype_name(name: str, device: str = "cpu") -> str:
    """A config's dtype with ``auto`` resolved for ``device``."""
    return fast_dtype(device) if name == AUTO else name


def dtype_report(device: str = "cpu") -> str:
    """One line for ``steercmp plan``: what ``auto`` resolves to here, and why."""
    forced = os.environ.get(FORCE_ENV)
    if forced:
        return f"dtype auto -> {fast_dtype(device)} (forced by {FORCE_ENV})"
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return f"dtype auto -> {fast_dtype(device)} (CUDA bf16 support)"
    rec = probe_cpu()
    return (f"dtype auto -> {rec['choice']} (probe on this CPU, capability {rec['key']['capability']}: "
            f"bf16 matmul {rec['speedup']:.2f}x the speed of fp32; bf16 needs >= {SPEEDUP_NEEDED}x)")


__all__ = ["AUTO", "FORCE_ENV", "dtype_report", "fast_dtype", "probe_cpu", "resolve_dtype_name"]
