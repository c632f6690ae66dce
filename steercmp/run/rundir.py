"""The run directory: every file name a run writes, the stage ledger, and atomic writes.

Every writer and reader of a run directory (runner, shards, report, CLI) takes its paths from
:class:`RunDir`, so a file is named once. Writes go to a temporary file that is then renamed,
so a reader (or a crash) never sees half a file. docs/schemas.md documents each file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import polars as pl
import torch
from safetensors.torch import load_file, save_file

from steercmp.paths import writable_dir

CONFIG = "config.yaml"
ACTIVATIONS = "activations.safetensors"
CONTEXTS = "contexts.json"
CELLS = "cells.parquet"
COMPLETIONS = "completions.parquet"
MANIFEST = "manifest.json"
STAGES_LEDGER = "stages.json"
PROPOSALS = "proposals"
METHODS = "methods"
SHARED_CACHE = "shared_cache"
UNITS = "units"
REPORT = "report"
SHARDS = "shards"


@attrs.frozen
class RunDir:
    """Paths inside one run directory."""

    root: Path = attrs.field(converter=Path)

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def activations(self) -> Path:
        return self.root / ACTIVATIONS

    @property
    def contexts(self) -> Path:
        return self.root / CONTEXTS

    @property
    def cells(self) -> Path:
        return self.root / CELLS

    @property
    def completions(self) -> Path:
        return self.root / COMPLETIONS

    @property
    def matched(self) -> Path:
        """Every method and control at the prompt's side-effect budget (the verdict's input)."""
        return self.root / "matched.parquet"

    @property
    def matched_completions(self) -> Path:
        """Completions sampled at the matched doses (the verdict's behavioural check)."""
        return self.root / "matched_completions.parquet"

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def pending(self) -> Path:
        """Present while the run's results lack methods still being built (a partial report)."""
        return self.root / "pending.json"

    @property
    def ledger(self) -> Path:
        return self.root / STAGES_LEDGER

    @property
    def report(self) -> Path:
        return self.root / REPORT

    def proposal_tensors(self, method: str) -> Path:
        return self.root / PROPOSALS / f"{method}.safetensors"

    def proposal_records(self, method: str) -> Path:
        return self.root / PROPOSALS / f"{method}.json"

    @property
    def methods(self) -> Path:
        return self.root / METHODS

    def method_dir(self, method: str) -> Path:
        return self.methods / method

    def method_table(self, method: str, name: str) -> Path:
        return self.method_dir(method) / f"{name}.parquet"

    def method_tables(self, name: str) -> dict[str, Path]:
        """``{method: path}`` of every method's table called ``name``."""
        return {p.parent.name: p for p in sorted(self.methods.glob(f"*/{name}.parquet"))}

    def method_cache(self, method: str, name: str, key: str) -> Path:
        return self.method_dir(method) / "cache" / f"{name}-{key}.json"

    def shared_cache(self, name: str, key: str) -> Path:
        """A computation any method of the run may reuse (``MethodRuntime.cached(..., shared=True)``)."""
        return self.root / SHARED_CACHE / f"{name}-{key}.json"

    def unit(self, stage: str, key: str) -> Path:
        return self.root / UNITS / stage / f"{key}.parquet"

    def shard(self, k: int) -> RunDir:
        return RunDir(self.root / SHARDS / str(k))

    def forget_results(self) -> None:
        """Make every stage and unit compute again (what ``--fresh`` means), by deleting the
        ledger, the units, the proposals and the methods' caches; the report is left readable."""
        import shutil

        self.ledger.unlink(missing_ok=True)
        for folder in (self.root / UNITS, self.root / PROPOSALS, *self.methods.glob("*/cache")):
            shutil.rmtree(folder, ignore_errors=True)

    # ------------------------------------------------------------ the stage ledger
    def stage_keys(self) -> dict[str, str]:
        """The key each finished stage was computed under (``stages.json``)."""
        return read_json(self.ledger) if self.ledger.exists() else {}

    def mark_done(self, stage: str, key: str) -> None:
        state = self.stage_keys()
        state[stage] = key
        write_json(self.ledger, state)

    def write_stage_keys(self, keys: Mapping[str, str]) -> None:
        write_json(self.ledger, dict(keys))


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
    """Create the run directory if needed and check it is writable, before any model loads."""
    return writable_dir(path, where=str(path))
