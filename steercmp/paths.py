"""Output paths are checked before any work starts: a command that would fail to write its
result after minutes of work fails at once instead, with one line naming the path. Locks keep
one writer per run directory and one builder per cached artefact."""

from __future__ import annotations

import errno
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from steercmp.errors import ConfigError


def writable_dir(path: str | Path, where: str | None = None, what: str = "output directory") -> Path:
    """Create ``path`` if needed and check that files can be written in it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a file", where=where or str(path),
                          fix="choose a directory path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".steercmp-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{what} {str(path)!r} is not writable ({exc.strerror})", where=where or str(path),
                          fix="choose another directory or fix its permissions") from None
    return path


@contextmanager
def sole_writer(folder: Path, where: str) -> Iterator[None]:
    """Hold ``folder``'s lock while writing into it; a second process is refused at once (two
    writers would interleave units and ledgers)."""
    lock = FileLock(str(folder / ".steercmp.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ConfigError(f"another steercmp process is writing run directory {str(folder)!r}", where=where,
                          fix="wait for it to finish, or choose another --out") from None
    try:
        yield
    finally:
        lock.release()


@contextmanager
def build_lock(target: Path, what: str, log: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the lock for building the cached artefact ``target`` (written to ``<target>.tmp``,
    then renamed). The cache folder must be writable; a second builder waits and then finds the
    artefact built (the caller checks again inside); a full disk becomes one line, and the
    half-written temporary folder is removed (a killed build's is removed by the next one)."""
    writable_dir(target.parent, where="STEERCMP_CACHE", what="cache directory")
    lock = FileLock(str(target) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        (log or (lambda m: print(m, file=sys.stderr)))(
            f"steercmp: waiting for another process that is building {what} ({target})")
        lock.acquire()
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        shutil.rmtree(target.with_name(target.name + ".tmp"), ignore_errors=True)
        raise ConfigError(f"the disk filled while building {what} in {str(target.parent)!r}", where="STEERCMP_CACHE",
                          fix="free some space, or set STEERCMP_CACHE to a folder on a larger disk") from None
    finally:
        lock.release()


def writable_file(path: str | Path, where: str | None = None) -> Path:
    """Check that ``path`` can be written as a file (its folder is created), without writing it."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"output file {str(path)!r} is a directory", where=where or str(path),
                          fix=f"name a file, e.g. {path / 'out.json'}")
    parent = writable_dir(path.parent if str(path.parent) else Path("."), where=where or str(path))
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"output file {str(path)!r} is not writable", where=where or str(path),
                          fix="choose another path or fix its permissions")
    return parent / path.name


__all__ = ["build_lock", "sole_writer", "writable_dir", "writable_file"]
