"""What every stage function reads and writes, built once per run by the runner.

The stages (``stage_extract`` -> ``stage_propose`` -> ``stage_score`` -> ``stage_completions``
-> ``stage_match``) are plain functions over one :class:`StageContext`: the run's settings (not
the parsed experiment: it stops at the runner), its directory and resume keys, the resident
model, and one :class:`Ledger` of what happened (timings, reuse, failures) that the manifest
reads. A stage's results are keyed by what determines them (:mod:`steercmp.run.keys`), so a rerun
reuses finished stages and units and ``--fresh`` ignores them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from steercmp.api import Method, RunSettings
from steercmp.battery import Battery
from steercmp.config_sections import CompletionSpec, ModelSpec
from steercmp.errors import ConfigError, NumericalError, PluginError, SteercmpError
from steercmp.lm.prompts import TokenizedPrompt
from steercmp.run.keys import RunKeys
from steercmp.run.rundir import RunDir
from steercmp.run.runtime import ResourceManager
from steercmp.run.sweep_settings import SweepSettings
from steercmp.score.sample import Sampling

Unit = tuple[str, str, str]  # (method key, prompt id, unit key)
#: how to repair a stored result that fails its schema check (docs/schemas.md): compute it again
RECOMPUTE = "delete the file or rerun with --fresh so it is computed again"


@attrs.define
class Ledger:
    """What the stages did: seconds per stage, reused stages and units, each stage's key as
    marked done, and the failures that were recorded while the others went on."""

    timings: dict[str, float] = attrs.Factory(dict)
    reused: list[str] = attrs.Factory(list)
    reused_units: dict[str, dict[str, int]] = attrs.Factory(dict)
    stage_keys: dict[str, str] = attrs.Factory(dict)
    failures: list[SteercmpError] = attrs.Factory(list)


@attrs.define
class StageContext:
    """The one argument of every stage function (see the module docstring)."""

    rundir: RunDir
    keys: RunKeys
    resources: ResourceManager
    sweep: SweepSettings
    sampling: Sampling
    battery: Battery
    model: ModelSpec
    #: the experiment file, named in error messages
    source: str
    single_token_families: bool
    #: the methods that passed validation, in the experiment's order
    methods: Mapping[str, Method]
    method_order: tuple[str, ...]
    controls: Mapping[str, Any]
    run_settings: Callable[[str], RunSettings]
    completions: CompletionSpec
    ledger: Ledger
    fresh: bool
    progress: Callable[..., Any]
    log: Callable[[str], None]
    #: each prompt tokenized once, by the preflight; extraction reads it
    tokens: dict[str, TokenizedPrompt] | None = None

    @property
    def families(self) -> dict[str, Mapping[str, Sequence[str]]]:
        return {p.id: p.families for p in self.battery.prompts}

    @property
    def run_dir(self) -> Path:
        return self.rundir.root

    def reusable(self, stage: str, key: str, *paths: Path) -> bool:
        return (not self.fresh and self.rundir.stage_keys().get(stage) == key
                and all(p.exists() for p in paths))

    def mark_done(self, stage: str, key: str) -> None:
        self.rundir.mark_done(stage, key)
        self.ledger.stage_keys[stage] = key

    def fail(self, method: str, doing: str, exc: BaseException) -> None:
        """Record one method's failure (its name in the message) and carry on with the others."""
        if isinstance(exc, SteercmpError):
            where = exc.where or f"{self.source}: methods.{method}"
            message = exc.message if method in exc.message else f"method {method!r}: {exc.message}"
            cls = type(exc) if type(exc) in (ConfigError, NumericalError, PluginError) else PluginError
            err: SteercmpError = cls(message, where=where, fix=exc.fix)
        else:
            err = PluginError(f"method {method!r} raised while {doing}: {type(exc).__name__}: {exc}",
                              where=f"{self.source}: methods.{method}",
                              fix="see the method's documentation or report a bug to its author")
        self.ledger.failures.append(err)
        self.log(f"[{doing}] {method} FAILED: {err.one_line()}")

    def pending(self, stage: str, units: list[Unit], key: str, book: Any) -> tuple[list[Unit], list[Unit], str]:
        """Split a stage's units into all and still-to-compute, and log it. Building cells may drop
        a failing method; its units then leave the stage (and its key)."""
        todo = [u for u in units if self.fresh or not self.rundir.unit(stage, u[2]).exists()]
        if todo:
            book.build()
            units = [u for u in units if u[0] in book.methods]
            todo = [u for u in todo if u[0] in book.methods]
            key = self.keys.units_stage(stage, units)
        self.ledger.reused_units[stage] = {"reused": len(units) - len(todo), "computed": len(todo)}
        self.log(f"[{stage}] {len(units)} units (method x prompt): {len(units) - len(todo)} reused, "
                 f"{len(todo)} to compute")
        return units, todo, key


def by_prompt(units: Sequence[Unit]) -> list[tuple[str, list[tuple[str, str]]]]:
    """``[(prompt id, [(method, unit key), ...]), ...]`` in first-seen order: the pending units of
    each prompt, computed together (one batch) and written apart."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for method, pid, ukey in units:
        groups.setdefault(pid, []).append((method, ukey))
    return list(groups.items())


def by_group(units: Sequence[Unit], groups: Sequence[Sequence[str]]) -> list[list[Unit]]:
    """The pending units of each group of prompts (``groups``: prompt ids in battery order),
    ordered by the group's prompts, then as ``units`` orders methods: the same batch whatever
    else is pending. Groups with nothing pending are left out."""
    place = {pid: (g, i) for g, ids in enumerate(groups) for i, pid in enumerate(ids)}
    out: dict[int, list[Unit]] = {}
    for unit in sorted(units, key=lambda u: place[u[1]]):  # stable: methods keep their order
        out.setdefault(place[unit[1]][0], []).append(unit)
    return [out[g] for g in sorted(out)]


__all__ = ["RECOMPUTE", "Ledger", "StageContext", "Unit", "by_group", "by_prompt"]
