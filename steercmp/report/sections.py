"""The report's core sections, in reading order, built from the statistics frames.

A :class:`Section` names its chart (a file stem, or ``None``), its tables and a note; plugins
add sections through the ``register_report_sections`` hook (:mod:`steercmp.report.writer`).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import polars as pl

from steercmp import stats
from steercmp.report.text_tables import (
    COND_RANK,
    Table,
    frame_table,
    hits_table,
    noop_table,
    paired_table,
    peaks_table,
    per_panel,
    power_table,
    status_table,
    summary_table,
)
from steercmp.stats.analysis import Analysis


@attrs.frozen
class Section:
    heading: str
    chart: str | None
    tables: Sequence[tuple[str, Table]] = ()
    note: str = ""


def _het_tables(het: pl.DataFrame, alphas: Sequence[float]) -> list[tuple[str, Table]]:
    out = []
    for panel, part in per_panel(het):
        m, s = part["method"][0], part["scaling"][0]
        for a in alphas:
            t = stats.heterogeneity_table(part, method=m, scaling=s, alpha=a)
            if t.height:
                cols = ["prompt_id", "selection"] + sorted(
                    (c for c in t.columns if c not in ("prompt_id", "selection")),
                    key=lambda c: COND_RANK.get(c, 99))
                out.append((f"{panel} · α={a:g}", frame_table(t.select(cols))))
    return out


def core_sections(a: Analysis) -> list[Section]:
    """The alpha-sweep pages of an analysis (details.md; the whole report without a match stage)."""
    alphas, cells, verdicts, summary = list(a.settings.alphas), a.cells, a.verdicts, a.summary
    paired_score, paired_hits, hits, rel, peaks = a.paired_score, a.paired_hits, a.hits, a.relative, a.peaks
    het, secondary = a.heterogeneity, a.secondary
    at_decision = summary.filter(pl.any_horizontal([(pl.col("alpha") - a).abs() < 1e-9 for a in alphas]))
    return [
        Section("What this battery can show", None, [("power per method and metric", power_table(verdicts))],
                "usable prompts in the primary analysis; the smallest p the one-sided exact sign-flip test "
                "can return at that n (2^-n); whether the level is reachable at all (if not, the verdict is "
                "'underpowered'); the mean difference detected with 80% power at the observed per-prompt "
                "spread (simulated, docs/statistics.md); and the prompts the observed effect would need."),
        Section("Prompts by status", None, [("target_edit rows per status", status_table(cells))],
                "ok / editable rows form the primary analysis; fallback (no editable term in any "
                "explanation) and below_fidelity rows are reported apart and never enter a verdict; "
                "dropped rows have no score."),
        Section("Logmass score at the decision alphas", "dose_response",
                [(p, summary_table(df)) for p, df in per_panel(at_decision)],
                "chart: mean paired effect (condition − noop score on the same prompt) against alpha; "
                "tables: absolute mean / median of edited − original next-token log-prob mass over prompts; "
                "positive = prompts with score > 0; 95% CI = percentile bootstrap over prompts."),
        Section("Logmass score, full alpha sweep", None,
                [(p, summary_table(df)) for p, df in per_panel(summary)]),
        Section("Paired comparisons: logmass (target_edit − control)", "forest",
                [(p, paired_table(df)) for p, df in per_panel(paired_score)],
                "per-prompt differences; one-sided exact sign-flip test of target > control (Monte "
                "Carlo above 20 prompts), no correction across controls (intersection-union rule)."),
        Section("Completion hit rates", "hit_rates", [(p, hits_table(df)) for p, df in per_panel(hits)],
                "seeds averaged within each prompt first; 95% CI = percentile bootstrap over prompts."),
        Section("Paired comparisons: edited-family completion hits", None,
                [(p, paired_table(df)) for p, df in per_panel(paired_hits)],
                "per-prompt seed-averaged edited-family hit rate, target minus control."),
        Section("Effect relative to noop", None, [(p, noop_table(df)) for p, df in per_panel(rel)],
                "condition − noop per prompt (unadjusted p)."),
        Section("Dose-response peaks (descriptive; not used for the verdict)", None,
                [(p, peaks_table(df)) for p, df in per_panel(peaks)]),
        Section("Per-prompt heterogeneity", "per_prompt_heatmap", _het_tables(het, alphas),
                "chart: per-prompt effect (condition − the prompt's noop score); tables: absolute score "
                "per prompt and condition at the decision alphas; selection = status of the prompt's "
                "target_edit row."),
        Section("Fallback and gated prompts (not in the verdicts)", None,
                [(p, summary_table(df)) for p, df in per_panel(secondary)],
                "text-edit prompts whose explanations name no editable term (fallback: nothing was edited) "
                "or whose reconstruction fell below the fidelity gate, summarised on their own."),
        Section("Target effect against injected norm", "injected_norm", [],
                "target_edit − noop score against the injected norm ‖δ‖·|α| for every activation method "
                "(raw scaling when available): methods compared at matched delta norm."),
    ]
