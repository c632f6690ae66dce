"""Output paths are checked before any work starts: a command that would fail to write its
result after minutes of work fails at once instead, with one line naming the path."""

from __future__ import annotations

import os
from pathlib import Path

from steercmp.errors import ConfigError


def writable_dir(path: str | Path, where: str | None = None) -> Path:
    """Create ``path`` if needed and check that files can be written in it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output directory {str(path)!r} is a file", where=where or str(path),
                          fix="choose a directory path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".steercmp-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"output directory is not writable ({exc.strerror})", where=where or str(path),
                          fix="choose another directory or fix its permissions") from None
    return path


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


__all__ = ["writable_dir", "writable_file"]
