"""Builders run in a fresh process, so the memory their training used goes back to the OS.

A cold run builds the mini NLA pair and the embedded SAE on first use. Trained in the run's own
process, their freed heap stayed fragmented in glibc's arenas, and every later stage of a cold run
peaked 0.2-1 GiB higher than the same stage of a warm run (docs/scaling.md). A fresh child starts
clean and its whole heap is returned when it exits. The child's peak resident memory comes back
with its result and is recorded by the runner beside the stage's own peak, so the report still
shows what the build cost.

The child is ``python -m steercmp.lm.build_process``, handed the call over stdin, rather than a
``multiprocessing`` spawn: spawn re-imports the caller's main script in the child, and a user's
script that starts a run without an ``if __name__ == "__main__":`` guard would start a second run
there, which then waits forever for the build lock its parent holds.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from steercmp.errors import SteercmpError
from steercmp.lm.memory import peak_rss_bytes

T = TypeVar("T")

#: (what, peak resident bytes) of every build process that ended since the runner last read them
_PEAKS: list[tuple[str, int]] = []


def in_fresh_process(what: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a fresh Python process (``fn`` and its arguments must pickle: a
    module-level function of an importable module); returns its result or raises its exception
    here. A child that dies without an answer (killed, out of memory) is one line naming ``what``
    and the fix. Ctrl-C stops the child too, and on Linux so does the run's own death (even by
    SIGKILL). The child inherits the environment (``STEERCMP_CACHE``, ``TQDM_DISABLE``, ...), the
    import path, stdout and stderr (its progress bars show)."""
    answer_fd, child_fd = os.pipe()
    child = subprocess.Popen([sys.executable, "-m", __name__, str(child_fd)], stdin=subprocess.PIPE,
                             pass_fds=(child_fd,))
    os.close(child_fd)  # the child holds the only writing end: its exit ends the read below
    try:
        with os.fdopen(answer_fd, "rb") as answers:
            try:
                pickle.dump((list(sys.path), os.getpid()), child.stdin)
                pickle.dump((fn, args, kwargs), child.stdin)
                child.stdin.close()
            except BrokenPipeError:  # the child died at start-up; its exit code says why
                pass
            data = answers.read()
        child.wait()
    except BaseException:
        child.kill()
        child.wait()
        raise
    ok, value, peak = pickle.loads(data) if data else (None, None, 0)
    if peak:
        _PEAKS.append((what, peak))
    if ok is None:
        raise SteercmpError(f"the process building {what} ended without a result (exit code {child.returncode}; "
                            "-9 is a kill, often for memory)",
                            fix="run the same command again (the half build is removed); if memory ran out, "
                                "close other programs or use a machine with more memory")
    if not ok:
        raise value
    return value


def build_peaks() -> list[tuple[str, int]]:
    """The ``(what, peak resident bytes)`` of build processes that ended since the last call."""
    out = list(_PEAKS)
    _PEAKS.clear()
    return out


def _die_with(parent: int) -> None:
    """Linux: the kernel kills this process when its parent dies (``PR_SET_PDEATHSIG``). A run
    killed with SIGKILL releases its build lock; an orphaned builder going on meanwhile would
    write into the folder the next run's builder starts again in."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent's Ctrl-C still stops the child
        return
    if os.getppid() != parent:  # the parent died before the call above took effect
        os._exit(1)


def _child(answer_fd: int) -> None:
    """The child's side: read the call, run it, send ``(ok, result or exception, peak RSS)``."""
    path, parent = pickle.load(sys.stdin.buffer)
    _die_with(parent)
    sys.path[:] = path  # before unpickling the function: its module may live on the parent's path
    with os.fdopen(answer_fd, "wb") as answers:
        try:
            fn, args, kwargs = pickle.load(sys.stdin.buffer)
            answer: tuple[bool, Any] = (True, fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent
            if not isinstance(exc, (SteercmpError, KeyboardInterrupt)):
                traceback.print_exc()  # where it failed, for a bug report; the parent re-raises it
            answer = (False, exc)
        sys.stdout.flush()
        try:
            data = pickle.dumps((*answer, peak_rss_bytes()))
        except Exception:  # noqa: BLE001 - an unpicklable result or exception
            data = pickle.dumps((False, RuntimeError(f"{answer[1]!r} could not be sent back from the build process"),
                                 peak_rss_bytes()))
        answers.write(data)


if __name__ == "__main__":
    _child(int(sys.argv[1]))
