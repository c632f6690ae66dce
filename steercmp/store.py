"""Run-directory I/O: atomic writes (temporary file, then rename) and content hashes."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import polars as pl
import torch
from safetensors.torch import load_file, save_file

from steercmp.errors import ConfigError


def stable_hash(obj: Any, n: int = 16) -> str:
    """A short sha256 of a JSON-serialisable object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` then rename ``tmp`` onto ``path``: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give results the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def write_parquet(path: Path, df: pl.DataFrame) -> Path:
    return atomic_write(path, lambda p: df.write_parquet(p))


def write_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Atomic safetensors write. The metadata goes in as ONE key holding sorted JSON: safetensors
    serialises a metadata map in hash order, so several keys would make the bytes differ run to run."""
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"steercmp": json.dumps(dict(metadata), sort_keys=True)} if metadata else None
    return atomic_write(path, lambda p: save_file(clean, str(p), metadata=meta))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def ensure_writable_dir(path: Path) -> Path:
    """Create ``path`` if needed and check it is writable, before any model loads."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".steercmp-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"output directory is not writable ({exc.strerror})", where=str(path),
                          fix="choose another --out directory or fix its permissions") from None
    return path
