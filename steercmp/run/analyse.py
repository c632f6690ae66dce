"""The stats stage: a run directory's frames and decision settings in, its statistics and verdicts
out (:func:`steercmp.stats.analysis.analyse`), written as the statistics tables and
``verdict.json``. The report renders what this returns; ``steercmp run`` and ``steercmp report``
both go through it.

Settings come from the arguments (an exploratory re-analysis), else the run's config.yaml
(pre-declared), else the defaults; a decision alpha the run did not sweep is one ConfigError
line, and nothing is written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import polars as pl
import torch
import yaml

from steercmp.decision_settings import (
    DEFAULT_MIN_EFFECT,
    DEFAULT_RANDOM_DRAWS,
    check_correction,
    check_level,
)
from steercmp.errors import ConfigError
from steercmp.run.proposals import load_proposals
from steercmp.run.rundir import RunDir
from steercmp.schemas import CELLS, COMPLETIONS, MATCHED, read_table
from steercmp.stats.analysis import Analysis, AnalysisSettings, analyse
from steercmp.stats.positive_control import roles_of


@attrs.frozen(eq=False)
class AnalysedRun:
    """What the report needs besides the :class:`Analysis`: the run, its config and where the
    statistics were written."""

    analysis: Analysis
    run: RunDir
    config: Mapping[str, Any]
    out: Path


def analyse_run(run_dir: Path, *, decision_alphas: Sequence[float] | None = None, n_boot: int = 10_000,
                seed: int | None = None, level: float | None = None, correction: str | None = None,
                out_dir: Path | None = None) -> AnalysedRun:
    """Analyse ``run_dir`` and write the statistics tables and ``verdict.json`` into ``out_dir``
    (default ``run_dir/report``). Arguments left None come from config.yaml (docs/statistics.md)."""
    run = RunDir(run_dir)
    if not run.cells.is_file():
        raise ConfigError("cells.parquet not found", where=str(run.root),
                          fix="run `steercmp run` first or point at a run directory")
    config = _read_config(run)
    alphas = _decision_alphas(decision_alphas, config, run)
    level, correction = _decision_setting(config, run, level, correction)
    seed = int(config.get("seed", 0) or 0) if seed is None else seed
    cells = read_table(run.cells, CELLS)
    completions = read_table(run.completions, COMPLETIONS) if run.completions.is_file() else None
    if completions is not None and completions.is_empty():
        completions = None
    swept = set(cells["alpha"].unique().to_list())
    unswept = [a for a in alphas if not any(abs(a - b) < 1e-9 for b in swept)]
    if unswept:
        raise ConfigError(f"decision alpha {unswept[0]:g} was not swept (the run has alphas "
                          f"{', '.join(f'{a:g}' for a in sorted(swept))})",
                          where="--alphas" if decision_alphas else f"{run.config}: decision.alphas",
                          fix="pick decision alphas from the swept alphas")
    out = Path(out_dir) if out_dir is not None else run.report
    out.mkdir(parents=True, exist_ok=True)
    decision = _declared(config, alphas, level, correction)
    preregistered = decision.pop("preregistered")
    settings = AnalysisSettings(alphas=tuple(alphas), level=level, correction=correction, n_boot=n_boot, seed=seed,
                                decision=decision, preregistered=preregistered, completion_seeds=_seeds(config))
    _, positive, _ = roles_of(cells)
    matched = read_table(run.matched, MATCHED) if run.matched.is_file() else None
    analysis = analyse(
        cells, completions, settings, matched=matched,
        matched_completions=(read_table(run.matched_completions, COMPLETIONS)
                             if matched is not None and run.matched_completions.is_file() else None),
        cosines=delta_cosines(run, positive, cells) if positive else None, pending=_partial_notice(run))
    for name, frame in analysis.tables().items():
        frame.write_parquet(out / name)
    (out / "verdict.json").write_text(json.dumps(analysis.verdict_record(), indent=2, default=str) + "\n")
    return AnalysedRun(analysis, run, config, out)


def _read_config(run: RunDir) -> dict[str, Any]:
    if not run.config.is_file():
        return {}
    data = yaml.safe_load(run.config.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError("config is not a mapping", where=str(run.config), fix="write a YAML mapping")
    return data


def _decision_alphas(arg: Sequence[float] | None, config: dict, run: RunDir) -> list[float]:
    if arg:
        return [float(a) for a in arg]
    raw = _section(config, "decision").get("alphas")
    if raw is not None and not isinstance(raw, list | tuple):
        raw = [raw]
    if raw:
        try:
            return [float(a) for a in raw]
        except (TypeError, ValueError):
            raise ConfigError(f"decision.alphas must be numbers, got {raw!r}", where=str(run.config),
                              fix="write e.g. decision: {alphas: [2, 4]}") from None
    raise ConfigError("no pre-declared decision alphas", where=str(run.config),
                      fix="set decision.alphas in config.yaml (e.g. decision: {alphas: [2, 4]}) "
                          "or pass --alphas to `steercmp report`")


def _decision_setting(config: dict, run: RunDir, level: float | None, correction: str | None) -> tuple[float, str]:
    """The level and the correction across methods: arguments, else config.yaml, else defaults."""
    decision = _section(config, "decision")
    where = str(run.config)
    level = check_level(level if level is not None else decision.get("level", 0.05),
                        where=f"{where}: decision.level" if level is None else "--level")
    correction = check_correction(correction if correction is not None else decision.get("correction", "none"),
                                  where=f"{where}: decision.correction" if correction is None else "--correction")
    return level, correction


def _section(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A mapping section of config.yaml, or an empty one (a missing or malformed section means defaults)."""
    value = config.get(name)
    return value if isinstance(value, dict) else {}


def _partial_notice(run: RunDir) -> tuple[list[str], str] | None:
    """The methods a partial run has not added yet (``pending.json``), and the line that says so."""
    if not run.pending.is_file():
        return None
    try:
        data = json.loads(run.pending.read_text())
        pending = dict(data.get("pending", {}))
        deferred = [str(s) for s in data.get("deferred", [])]
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    builds = "; ".join(sorted(set(map(str, pending.values()))))
    later = (" The alpha sweep's sampled completions of the methods that inject (descriptive; the matched "
             "verdicts and their completions are here) come with them." if "completions" in deferred else "")
    return list(pending), (f"PARTIAL REPORT: {', '.join(pending)} not included yet (waiting for {builds}).{later} "
                           "The report is rewritten when they finish; if the run was stopped, the same `steercmp run` "
                           "resumes it.")


def _seeds(config: Mapping[str, Any]) -> int:
    comp = _section(config, "completions")
    return int(comp.get("seeds", 5) or 5)


def _declared(config: Mapping[str, Any], alphas: Sequence[float], level: float, correction: str) -> dict[str, Any]:
    """The decision settings in force, and whether they are the pre-declared ones (config.yaml):
    a report run with other flags is an exploratory re-analysis, and says so."""
    declared = _section(config, "decision")
    min_effect = declared.get("min_effect", DEFAULT_MIN_EFFECT)
    settings = {"alphas": [float(a) for a in alphas], "level": level, "correction": correction,
                "min_effect": float(min_effect) if isinstance(min_effect, int | float) else DEFAULT_MIN_EFFECT,
                "max_kl": declared.get("max_kl", "auto"), "random_draws": declared.get("random_draws", DEFAULT_RANDOM_DRAWS)}
    same = (not declared or ([float(a) for a in declared.get("alphas", alphas)] == settings["alphas"]
                             and float(declared.get("level", level)) == level
                             and declared.get("correction", correction) == correction))
    return settings | {"preregistered": bool(same)}


COSINE_SCHEMA = {"method": pl.String, "prompt_id": pl.String, "status": pl.String, "cosine": pl.Float64,
                 "delta_norm": pl.Float64, "positive_norm": pl.Float64, "chance_band": pl.Float64}


def delta_cosines(run: RunDir, positive: str, cells: pl.DataFrame) -> pl.DataFrame:
    """Per method and prompt: the cosine between the method's target delta and the positive
    control's delta (does the method point where a known-working intervention points?).
    Methods without deltas (prompting) and prompts without a live delta on both sides are left out."""
    methods = sorted(set(cells["method"].unique().to_list()) - {positive})
    try:
        pc = {p.prompt_id: p for p in load_proposals(run, positive) if p.family == "edited"}
    except (OSError, KeyError, ValueError):
        return pl.DataFrame(schema=COSINE_SCHEMA)
    rows = []
    for m in methods:
        if not run.proposal_records(m).is_file():
            continue
        try:
            props = load_proposals(run, m)
        except (OSError, KeyError, ValueError):
            continue
        for p in props:
            ref = pc.get(p.prompt_id)
            if (p.family != "edited" or p.delta is None or p.status == "dropped" or ref is None
                    or ref.delta is None):
                continue
            a, b = p.delta.float(), ref.delta.float()
            if float(a.norm()) == 0.0 or float(b.norm()) == 0.0:
                continue
            rows.append({"method": m, "prompt_id": p.prompt_id, "status": p.status,
                         "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
                         "delta_norm": float(a.norm()), "positive_norm": float(b.norm()),
                         # two standard deviations of the cosine of two random directions in d dims
                         "chance_band": 2.0 / float(a.numel()) ** 0.5})
    return pl.DataFrame(rows, schema=COSINE_SCHEMA)


__all__ = ["COSINE_SCHEMA", "AnalysedRun", "analyse_run", "delta_cosines"]
