"""An in-memory :class:`~steercmp.api.MethodRuntime` for plugin tests (no run directory)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import polars as pl
import torch

from steercmp.api import MethodRuntime, Resource
from steercmp.hashing import make_generator, stable_hash
from steercmp.lm.capture import capture_at
from steercmp.lm.load import LoadedModel


class ConformanceError(AssertionError):
    """A plugin failed a conformance check; the message names the check and the fix."""

    def __init__(self, check: str, message: str):
        self.check = check
        super().__init__(f"[{check}] {message}")


class TestRuntime(MethodRuntime):
    """A :class:`~steercmp.api.MethodRuntime` for tests: no run directory, everything in memory.

    ``load`` yields ``resource.loader()`` (and calls its ``unload()`` afterwards, if any);
    ``base`` yields the given :class:`~steercmp.lm.load.LoadedModel`; ``generator`` derives seeds
    exactly as the runner does; ``write_table`` keeps rows in :attr:`tables`; ``cached`` computes
    and keeps a JSON round-trip of the value (the runner stores it as JSON), so a value that would
    not survive the runner's cache fails here too.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, lm: LoadedModel, *, seed: int = 0, layer: int = 2, method_key: str = "method",
                 run_dir: str | Path | None = None, chat_template: bool = False):
        self.lm = lm
        self.seed = seed
        self.layer = layer
        self.device = "cpu"
        self.dtype = torch.float32
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.method_key = method_key
        self.tables: dict[str, list[dict[str, Any]]] = {}
        self.cache: dict[tuple[str, str, bool], Any] = {}
        self.loaded: list[str] = []
        self.base_calls = 0
        self.captures = 0
        self.chat_template = chat_template

    @contextmanager
    def load(self, resource: Resource) -> Iterator[Any]:
        if not isinstance(resource, Resource):
            raise ConformanceError("resources", f"runtime.load() got {resource!r}, not a steercmp.api.Resource")
        self.loaded.append(resource.name)
        obj = resource.loader()
        try:
            yield obj
        finally:
            unload = getattr(obj, "unload", None)
            if callable(unload):
                unload()

    @contextmanager
    def base(self) -> Iterator[LoadedModel]:
        self.base_calls += 1
        yield self.lm

    def capture(self, inputs: Sequence[str | Sequence[int]], positions: Sequence[int | str] | None = None,
                *, layer: int | None = None, batch_size: int = 8) -> list[torch.Tensor]:
        self.captures += 1
        return capture_at(self.lm, self.layer if layer is None else layer, inputs, positions,
                          chat_template=self.chat_template, batch_size=batch_size)

    def generator(self, *key: object, shared: bool = False) -> torch.Generator:
        return make_generator(self.seed, *key) if shared else make_generator(self.seed, self.method_key, *key)

    def progress(self, iterable: Any, desc: str, total: int | None = None) -> Iterator[Any]:
        return iter(iterable)

    def write_table(self, name: str, rows: Sequence[Mapping[str, Any]]) -> None:
        rows = [dict(r) for r in rows]
        if rows:
            pl.DataFrame(rows)  # the runner writes parquet: rows must make a DataFrame
        self.tables[name] = rows

    def cached(self, name: str, key: Mapping[str, Any], compute: Callable[[], Any], *,
               shared: bool = False) -> Any:
        ident = (name, stable_hash(dict(key)), shared)
        if ident not in self.cache:
            value = compute()
            try:
                self.cache[ident] = json.loads(json.dumps(value))
            except (TypeError, ValueError) as exc:
                raise ConformanceError("cached", f"runtime.cached({name!r}) got a value that is not JSON: {exc}") from exc
        return self.cache[ident]


