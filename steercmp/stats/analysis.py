"""The stats stage's result: every statistic and verdict of a run, from its frames and the decision
settings, before anything is drawn.

:func:`analyse` is pure (frames in, an :class:`Analysis` out); :mod:`steercmp.run.analyse` reads a
run directory into it and writes its tables and ``verdict.json``; the report only renders it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import polars as pl

from steercmp.stats import matched as mv
from steercmp.stats.decision import verdict
from steercmp.stats.paired import (
    CONTROLS,
    TARGET,
    PairedTest,
    paired,
    paired_hits,
    relative_to_noop,
)
from steercmp.stats.positive_control import (
    POSITIVE_CONTROL,
    Reference,
    build_reference,
    order_verdicts,
    roles_of,
    site_banner,
)
from steercmp.stats.summary import SECONDARY, heterogeneity, hit_rates, peaks, summarize

#: matched-dose verdicts that say the method steers (the site banner's "wins")
WINS = (mv.SUPPORTED, mv.SHIFT_ONLY)


@attrs.frozen
class AnalysisSettings:
    """The decision settings in force: ``decision`` is what ``verdict.json`` records (alphas,
    level, correction, min_effect, max_kl, random_draws), ``preregistered`` whether they are the
    run's declared ones; ``completion_seeds`` sizes the expected-hits estimate."""

    alphas: tuple[float, ...]
    level: float
    correction: str
    n_boot: int
    seed: int
    decision: Mapping[str, Any]
    preregistered: bool
    completion_seeds: int = 5


@attrs.frozen(eq=False)
class Analysis:
    """Every statistic of a run. ``verdicts`` are the alpha-sweep (exploratory) verdicts;
    ``matched_verdicts`` the matched-dose ones (None without ``matched.parquet``); ``pending`` the
    methods a partial run has not added yet and the line that says so."""

    settings: AnalysisSettings
    cells: pl.DataFrame
    completions: pl.DataFrame | None
    controls: list[str]
    summary: pl.DataFrame
    secondary: pl.DataFrame
    paired_score: pl.DataFrame
    relative: pl.DataFrame
    peaks: pl.DataFrame
    heterogeneity: pl.DataFrame
    hits: pl.DataFrame | None
    paired_hits: pl.DataFrame | None
    method_pairs: list[tuple[str, str]]
    verdicts: list[dict[str, Any]]
    reference: Reference
    site: str
    matched_verdicts: list[dict[str, Any]] | None
    pending: tuple[list[str], str] | None = None

    def tables(self) -> dict[str, pl.DataFrame]:
        """The statistics tables by file name (docs/schemas.md), only those the run has."""
        ref = self.reference
        out = {"summary.parquet": self.summary, "paired.parquet": self.paired_score,
               "relative_to_noop.parquet": self.relative}
        optional = {"paired_completions.parquet": self.paired_hits, "hit_rates.parquet": self.hits,
                    "summary_secondary.parquet": None if self.secondary.is_empty() else self.secondary,
                    "positive_control.parquet": None if ref.fractions.is_empty() else ref.fractions,
                    "absolute_logmass.parquet": ref.logmass,
                    "positive_control_cosine.parquet": None if ref.cosines.is_empty() else ref.cosines}
        return out | {name: frame for name, frame in optional.items() if frame is not None}

    def verdict_record(self) -> dict[str, Any]:
        """``verdict.json``: the matched-dose verdicts (the alpha sweep under ``alpha_sweep``), or
        the alpha-sweep verdicts where the run has no match stage."""
        s = self.settings
        sweep = {"site": self.site, "decision_alphas": list(s.alphas), "controls": self.controls, "level": s.level,
                 "rule": "intersection-union at the decision alphas (exploratory dose-response view)",
                 "correction_across_controls": "none (intersection-union test)",
                 "correction_across_methods": s.correction, "verdicts": self.verdicts}
        head: dict[str, Any] = {"positive_control": self.reference.positive, "ceilings": list(self.reference.ceilings),
                                "decision": dict(s.decision), "preregistered": s.preregistered, "n_boot": s.n_boot,
                                "seed": s.seed, "completions_available": self.completions is not None}
        if self.matched_verdicts is not None:
            head |= {"rule": "matched-dose, three outcomes, intention-to-treat (docs/statistics.md)",
                     "site": matched_banner(self.matched_verdicts), "verdicts": self.matched_verdicts,
                     "alpha_sweep": sweep}
        else:
            head |= {**sweep, "rule": "intersection-union (no matched.parquet: run the match stage for the "
                                      "matched-dose verdict)"}
        if self.pending is not None:
            head["partial"] = {"pending": self.pending[0], "notice": self.pending[1]}
        return head


def analyse(cells: pl.DataFrame, completions: pl.DataFrame | None, settings: AnalysisSettings, *,
            matched: pl.DataFrame | None = None, matched_completions: pl.DataFrame | None = None,
            cosines: pl.DataFrame | None = None, pending: tuple[list[str], str] | None = None) -> Analysis:
    """Every statistic and verdict of a run's frames under ``settings`` (docs/statistics.md)."""
    s, n_boot, seed = settings, settings.n_boot, settings.seed
    controls = present_controls(cells)
    summary = summarize(cells, n_boot=n_boot, seed=seed)
    secondary = summarize(cells, n_boot=n_boot, seed=seed, subset=SECONDARY).filter(pl.col("n") > 0)
    test = PairedTest(n_boot=n_boot, seed=seed, level=s.level)
    paired_score = paired(cells, controls=controls, test=test)
    hits = p_hits = None
    if completions is not None:
        hits = hit_rates(completions, n_boot=n_boot, seed=seed)
        p_hits = paired_hits(completions, controls=controls, test=test)
    roles, _, ceilings = roles_of(cells)
    method_pairs = sorted({(r["method"], r["scaling"]) for r in cells.select("method", "scaling").unique().to_dicts()
                           if r["method"] not in ceilings})  # a ceiling is a reference row, not a method
    verdicts = order_verdicts(verdict(paired_score, p_hits, decision_alphas=list(s.alphas), methods=method_pairs,
                                      controls=controls, not_applicable=not_applicable(cells), level=s.level,
                                      correction=s.correction), roles)
    reference = build_reference(cells, list(s.alphas), n_boot=n_boot, seed=seed, cosines=cosines)
    matched_verdicts = None
    if matched is not None:
        matched_verdicts = mv.matched_verdicts(
            matched, matched_completions, level=s.level, min_effect=s.decision["min_effect"], n_boot=n_boot,
            seed=seed, roles=roles,
            methods=[m for m in matched["method"].unique(maintain_order=True).to_list() if m not in ceilings])
        matched_verdicts.sort(key=lambda v: v.get("role") != POSITIVE_CONTROL)
        for v in matched_verdicts:
            if matched_completions is not None and v["completions"] and all(
                    c["outcome"] == "cannot tell" for c in v["completions"].values()):
                v["expected_edited_hits"] = mv.expected_hits(matched, v["method"], s.completion_seeds)
    return Analysis(settings=s, cells=cells, completions=completions, controls=controls, summary=summary,
                    secondary=secondary, paired_score=paired_score,
                    relative=relative_to_noop(cells, test=PairedTest(n_boot=n_boot, seed=seed)), peaks=peaks(summary),
                    heterogeneity=heterogeneity(cells), hits=hits, paired_hits=p_hits, method_pairs=method_pairs,
                    verdicts=verdicts, reference=reference, site=site_banner(verdicts, reference),
                    matched_verdicts=matched_verdicts, pending=pending)


def present_controls(cells: pl.DataFrame) -> list[str]:
    """The run's controls: every condition but the target, known ones in the usual order."""
    present = [c for c in cells["condition"].unique().to_list() if c != TARGET]
    return [c for c in CONTROLS if c in present] + sorted(c for c in present if c not in CONTROLS)


def not_applicable(cells: pl.DataFrame) -> dict[str, list[str]]:
    """Controls whose every cell is not_applicable for a method (e.g. wrong_position for prompting)."""
    status = cells.group_by("method", "condition").agg(na=(pl.col("status") == "not_applicable").all())
    out: dict[str, list[str]] = {}
    for r in status.filter(pl.col("na")).iter_rows(named=True):
        out.setdefault(r["method"], []).append(r["condition"])
    return out


def injects(v: Mapping[str, Any]) -> bool:
    """Whether the method injects at the site (prompting methods do not: they say nothing about it)."""
    return any(s in ("matched", "fixed", "off_budget", "unreachable") for s in (v.get("statuses") or {}))


def matched_banner(verdicts: Sequence[Mapping[str, Any]]) -> str:
    """Can anything tested steer this site, at the budget? Only methods that inject there count."""
    pc = next((v for v in verdicts if v.get("role") == POSITIVE_CONTROL), None)
    inj = [v for v in verdicts if injects(v) and v is not pc]
    winners = [v["method"] for v in inj if v["verdict"] in WINS]
    if pc is None:
        head = ("No positive control in this run (add counterfactual_patch): the budget is decision.max_kl, and a "
                "method's failure cannot be told apart from a site that nothing steers.")
        return head + (f" Injecting methods that win: {', '.join(winners)}." if winners else "")
    state = f"the positive control reads '{pc['verdict']}' ({pc['explanation']})"
    if pc["verdict"] in WINS:
        return f"The site can be steered at the budget: {state}. A method's failure below is the method's."
    if pc["verdict"] == mv.INCONCLUSIVE:
        return f"Cannot tell whether the site can be steered: {state}. Read every verdict below as open about the site."
    if winners:
        return (f"The positive control does not win ({state}), but injecting methods do ({', '.join(winners)}): the "
                f"site can be steered at this cost; the patch is not a sufficient reference here.")
    return (f"Nothing that injects at this site wins at the budget: {state}. A method's failure below says little "
            f"about the method.")


__all__ = ["WINS", "Analysis", "AnalysisSettings", "analyse", "injects", "matched_banner", "not_applicable",
           "present_controls"]
