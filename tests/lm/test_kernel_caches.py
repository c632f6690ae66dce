"""The CPU matmul libraries' shape caches stay bounded once steercmp is imported.

Each distinct matmul shape used to leave ~0.5 MiB in the C heap (ideep's and oneDNN's caches, 1024
entries each by default); a run feeds hundreds of shapes. The check runs in fresh interpreters,
since both libraries read their limits once, at their first kernel."""

import os
import subprocess
import sys

import pytest

from steercmp import KERNEL_CACHE_LIMITS

PROBE = """
import ctypes, os, sys
{pre}
import torch
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                              "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
w = torch.randn(1024, 256, dtype=torch.bfloat16)
with torch.no_grad():
    torch.nn.functional.linear(torch.randn(1, 256, dtype=torch.bfloat16), w)
    before = libc.mallinfo2().uordblks
    for rows in range(2, 602):
        torch.nn.functional.linear(torch.randn(rows, 256, dtype=torch.bfloat16), w)
print(libc.mallinfo2().uordblks - before)
"""


def _growth(pre: str, env_drop: tuple[str, ...] = ()) -> int:
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    res = subprocess.run([sys.executable, "-c", PROBE.format(pre=pre)], capture_output=True, text=True,
                         env=env, check=False, timeout=120)
    if res.returncode != 0:
        pytest.skip(f"no glibc mallinfo2 here: {res.stderr.strip().splitlines()[-1:]}")
    return int(res.stdout.strip().splitlines()[-1])


def test_importing_steercmp_bounds_the_kernel_caches():
    bounded = _growth("import steercmp", env_drop=tuple(KERNEL_CACHE_LIMITS))
    assert bounded < 128 * 2**20, f"600 matmul shapes left {bounded / 2**20:.0f} MiB in the C heap"


def test_the_users_own_limit_wins():
    code = "import os; os.environ['LRU_CACHE_CAPACITY'] = '7'; import steercmp; print(os.environ['LRU_CACHE_CAPACITY'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "7"


def test_without_the_limits_the_caches_grow():
    """The reference the first test stands against: on a CPU whose bf16 matmuls go through oneDNN the
    unbounded caches keep several MiB per batch of shapes (elsewhere the caches are not used)."""
    unbounded = _growth("", env_drop=tuple(KERNEL_CACHE_LIMITS))
    bounded = _growth("import steercmp", env_drop=tuple(KERNEL_CACHE_LIMITS))
    if unbounded < 24 * 2**20:
        pytest.skip(f"this CPU's bf16 matmuls keep no per-shape cache ({unbounded / 2**20:.0f} MiB)")
    assert bounded < unbounded / 2
