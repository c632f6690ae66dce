"""Resident-memory readings for the staged pipeline (CPU RSS from /proc; CUDA allocator peaks)."""

from __future__ import annotations

import torch


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Current resident set size of this process."""
    kib = _status_kib("VmRSS")
    return (kib or 0) * 1024


def peak_rss_bytes() -> int:
    """High-water mark of the resident set size (whole process lifetime)."""
    kib = _status_kib("VmHWM")
    return (kib or 0) * 1024


def reset_peak() -> None:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0) and CUDA's peak counters."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def trim_heap() -> None:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    A stage's transient buffers (a batch's 262k-vocabulary logits, sampling state) are freed into
    the allocator's arenas, which keep them resident: trimmed at every stage's end, the next stage
    starts from what is live, not from the last stage's high-water mark."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cuda_peak_bytes() -> int:
    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else 0


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def gib(n: int | float) -> str:
    return f"{n / 2**30:.2f} GiB"
