"""What a run lends its methods: one resident model at a time, captures, seeds and method I/O.

:class:`ResourceManager` keeps ONE heavy object resident (base model, AV, AR, SAE); loading
another releases it first and logs memory per stage. :class:`RunnerRuntime` is the
:class:`steercmp.api.MethodRuntime` a method sees while it proposes.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import polars as pl
import torch

from steercmp.api import MethodRuntime, Resource, RunSettings, progress_bar
from steercmp.config import ModelSpec
from steercmp.hashing import make_generator, stable_hash
from steercmp.lm.build_process import build_peaks
from steercmp.lm.capture import capture_at
from steercmp.lm.load import LoadedModel, load_base_model, parse_dtype, release
from steercmp.lm.memory import gib, model_bytes, peak_rss_bytes, reset_peak, rss_bytes, trim_heap
from steercmp.run.rundir import RunDir, read_json, write_json, write_parquet

Progress = Callable[..., Any]


def tqdm_progress(enabled: bool) -> Progress:
    """``progress(iterable, desc, total)``: a tqdm bar on stderr, or the bare iterable."""
    def progress(iterable: Any, desc: str, total: int | None = None) -> Any:
        return progress_bar(iterable, enabled=enabled, desc=desc, total=total, leave=False, file=sys.stderr)

    return progress


def _object_bytes(obj: Any) -> int:
    if isinstance(obj, LoadedModel):
        return model_bytes(obj.model) if obj.model is not None else 0
    if isinstance(obj, torch.nn.Module):
        return model_bytes(obj)
    inner = getattr(obj, "model", None)
    if isinstance(inner, torch.nn.Module):
        return model_bytes(inner)
    held = getattr(obj, "lm", None)  # a wrapper around a loaded model (an NLA AV or AR)
    if isinstance(held, LoadedModel):
        names = [a.name for a in getattr(type(obj), "__attrs_attrs__", ())] or list(getattr(obj, "__dict__", {}))
        modules = [getattr(obj, n, None) for n in names]
        return _object_bytes(held) + sum(model_bytes(m) for m in modules if isinstance(m, torch.nn.Module))
    return 0


class ResourceManager:
    """Keeps ONE heavy object resident; loading another releases it first. Logs memory per stage."""

    def __init__(self, model: ModelSpec, progress: bool, log: Callable[[str], None]):
        self.model = model
        self.progress = progress
        self.log = log
        self.resident: tuple[str, Any] | None = None
        self.memory: list[dict[str, Any]] = []
        #: ``cached(..., shared=True)`` files and baseline units written by this run: reused under
        #: ``--fresh`` too
        self.written_this_run: set[Path] = set()

    def acquire(self, name: str, loader: Callable[[], Any]) -> Any:
        if self.resident is not None and self.resident[0] == name:
            return self.resident[1]
        self.release()
        reset_peak()
        start = time.perf_counter()
        obj = loader()
        self.resident = (name, obj)
        self.memory.append({"stage": f"load {name}", "resident": name, "model_bytes": _object_bytes(obj),
                            "rss_bytes": rss_bytes(), "load_seconds": time.perf_counter() - start})
        return obj

    def note(self, stage: str) -> None:
        """Record memory at the end of a stage: its peak (since the last model load or stage
        end), and the resident memory after returning the stage's freed buffers to the OS."""
        gc.collect()
        trim_heap()
        name = self.resident[0] if self.resident else None
        held = _object_bytes(self.resident[1]) if self.resident else 0
        entry = {"stage": stage, "resident": name, "model_bytes": held, "rss_bytes": rss_bytes(),
                 "peak_rss_bytes": peak_rss_bytes()}
        if torch.cuda.is_available():
            entry["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated())
        builds = [{"what": what, "peak_rss_bytes": peak} for what, peak in build_peaks()]
        if builds:  # a builder's own process during this stage (its peak is not in this one's)
            entry["build_processes"] = builds
        self.memory.append(entry)
        self.log(f"  memory after {stage}: resident={name} model={gib(held)} rss={gib(entry['rss_bytes'])} "
                 f"peak={gib(entry['peak_rss_bytes'])}"
                 + "".join(f"; build process ({b['what']}) peak={gib(b['peak_rss_bytes'])}" for b in builds))
        reset_peak()  # the next stage's peak is its own

    def release(self) -> None:
        if self.resident is None:
            return
        _name, obj = self.resident
        self.resident = None
        if isinstance(obj, LoadedModel):
            obj.unload()
        else:
            unload = getattr(obj, "unload", None)
            if callable(unload):
                unload()
        del obj
        release(None)

    def base(self) -> LoadedModel:
        spec = self.model
        return self.acquire("base", lambda: load_base_model(
            spec.id, dtype=spec.dtype, device=spec.device, device_map=spec.device_map,
            trust_remote_code=spec.trust_remote_code, revision=spec.revision, progress=self.progress))


class RunnerRuntime(MethodRuntime):
    """The runtime a method sees: staged loading through the shared :class:`ResourceManager`."""

    def __init__(self, resources: ResourceManager, run: RunDir, settings: RunSettings, *,
                 progress: Progress, fresh: bool = False):
        self._resources = resources
        self._run = run
        self._key = settings.label
        self._progress = progress
        self._fresh = fresh
        self._chat = settings.chat_template
        self.seed = settings.seed
        self.layer = settings.layer
        self.device = settings.model_device
        self.dtype = parse_dtype(settings.model_dtype, settings.model_device)
        self.run_dir = run.root

    @contextmanager
    def load(self, resource: Resource) -> Iterator[Any]:
        obj = self._resources.acquire(f"{self._key}:{resource.name}", resource.loader)
        yield obj
        self._resources.note(f"{self._key}:{resource.name}")

    @contextmanager
    def base(self) -> Iterator[LoadedModel]:
        yield self._resources.base()

    def capture(self, inputs: Sequence[str | Sequence[int]], positions: Sequence[int | str] | None = None,
                *, layer: int | None = None, batch_size: int = 8) -> list[torch.Tensor]:
        return capture_at(self._resources.base(), self.layer if layer is None else layer, inputs, positions,
                          chat_template=self._chat, batch_size=batch_size)

    def generator(self, *key: object, shared: bool = False) -> torch.Generator:
        return make_generator(self.seed, *key) if shared else make_generator(self.seed, self._key, *key)

    def progress(self, iterable: Any, desc: str, total: int | None = None) -> Iterator[Any]:
        return self._progress(iterable, f"{self._key}: {desc}", total)

    def write_table(self, name: str, rows: Sequence[Mapping[str, Any]]) -> None:
        df = pl.DataFrame([dict(r) for r in rows]) if rows else pl.DataFrame()
        write_parquet(self._run.method_table(self._key, name), df)

    def cached(self, name: str, key: Mapping[str, Any], compute: Callable[[], Any], *,
               shared: bool = False) -> Any:
        digest = stable_hash(key)
        path = self._run.shared_cache(name, digest) if shared else self._run.method_cache(self._key, name, digest)
        if path.exists() and (not self._fresh or path in self._resources.written_this_run):
            return read_json(path)
        value = compute()
        write_json(path, value)
        self._resources.written_this_run.add(path)
        return value
