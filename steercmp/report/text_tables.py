"""Plain tables for the report: number formatting and the table builders every page uses.

A :data:`Table` is ``(header, rows)`` of strings, rendered to Markdown or HTML by
:mod:`steercmp.report.pages`; builders take the statistics frames of :mod:`steercmp.stats`.
"""

from __future__ import annotations

import math
from typing import Any

import polars as pl

from steercmp.report.charts import CONDITION_ORDER
from steercmp.stats.format import fmt, fmt_ci  # re-exported: every page formats with them

Table = tuple[list[str], list[list[str]]]
COND_RANK = {c: i for i, c in enumerate(CONDITION_ORDER)}


def fmt_p(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "NA"
    return f"{x:.4f}" if x >= 1e-4 else f"{x:.1e}"


def condition_sorted(df: pl.DataFrame, col: str = "condition") -> pl.DataFrame:
    """``df`` with a ``_rank`` column ordering conditions as the charts do."""
    return df.with_columns(
        pl.col(col).replace_strict(COND_RANK, default=99, return_dtype=pl.Int64).alias("_rank"))


def per_panel(df: pl.DataFrame | None) -> list[tuple[str, pl.DataFrame]]:
    """``("method · scaling", rows)`` for each method and scaling in ``df``."""
    if df is None or df.is_empty():
        return []
    pairs = sorted({(r["method"], r["scaling"]) for r in df.select("method", "scaling").unique().to_dicts()})
    return [(f"{m} · {s}", df.filter((pl.col("method") == m) & (pl.col("scaling") == s))) for m, s in pairs]


def summary_table(summary: pl.DataFrame) -> Table:
    df = condition_sorted(summary).sort("alpha", "_rank", "condition")
    rows = [[r["condition"], f"{r['alpha']:g}", fmt(r["mean"]), fmt(r["median"]),
             f"{r['n_positive']}/{r['n']}", fmt_ci(r["ci_low"], r["ci_high"]), str(r["n_excluded"])]
            for r in df.iter_rows(named=True)]
    return (["condition", "alpha", "mean edited−original logmass", "median", "positive prompts",
             "95% CI (mean)", "excluded"], rows)


def paired_table(paired: pl.DataFrame, spec: str = "+.3f") -> Table:
    df = condition_sorted(paired, "control").sort("alpha", "_rank")
    rows = [[f"{r['alpha']:g}", r["control"], str(r["n"]), fmt(r["mean_diff"], spec),
             fmt_ci(r["ci_low"], r["ci_high"], spec), fmt_p(r["p_value"]), fmt_p(r["min_p"]),
             fmt(r["mde"], ".3g"), fmt(r["n_for_power"])]
            for r in df.iter_rows(named=True)]
    return (["alpha", "control", "n", "mean diff (target − control)", "95% CI", "p (one-sided)",
             "smallest possible p", "MDE (80%)", "prompts for 80%"], rows)


def power_table(verdicts: list[dict]) -> Table:
    """Per method, scaling and metric: usable prompts, the smallest achievable p, whether the
    level is reachable, the minimum detectable effect and the prompts the observed effect needs."""
    rows = []
    for v in verdicts:
        for metric, pw in v["power"].items():
            rows.append([f"{v['method']} · {v['scaling']}", metric, str(pw["n"]), fmt_p(pw["min_p"]),
                         "yes" if pw["reachable"] else f"no (needs ≥ {pw['prompts_needed']} prompts)",
                         fmt(pw["mde"], ".3g"), fmt(pw["n_for_power"])])
    return (["method", "metric", "usable prompts", "smallest possible p", "can reach the level",
             "MDE at 80% power", "prompts for 80% at the observed effect"], rows)


def status_table(cells: pl.DataFrame) -> Table:
    """Per method: how many prompts each status covers (primary rows vs fallback, gated, dropped),
    read from the target_edit cells."""
    tgt = cells.filter(pl.col("condition") == "target_edit").select("method", "prompt_id", "status").unique()
    counts = tgt.group_by("method", "status").agg(pl.len().alias("n"), pl.col("prompt_id").sort().alias("ids"))
    rows = []
    for r in counts.sort("method", "status").iter_rows(named=True):
        ids = ", ".join(r["ids"][:12]) + (" …" if len(r["ids"]) > 12 else "")
        rows.append([r["method"], r["status"], str(r["n"]), ids])
    return (["method", "status", "prompts", "prompt ids"], rows)


def hits_table(hits: pl.DataFrame) -> Table:
    df = condition_sorted(hits).sort("alpha", "_rank", "family")
    rows = [[r["condition"], f"{r['alpha']:g}", r["family"], fmt(r["rate"], ".3f"),
             fmt_ci(r["ci_low"], r["ci_high"], ".3f"), str(r["n_prompts"]), str(r["n_completions"])]
            for r in df.iter_rows(named=True)]
    return (["condition", "alpha", "family", "hit rate", "95% CI", "prompts", "completions"], rows)


def noop_table(rel: pl.DataFrame) -> Table:
    df = condition_sorted(rel).sort("alpha", "_rank")
    rows = [[r["condition"], f"{r['alpha']:g}", str(r["n"]), fmt(r["mean_diff"]),
             fmt_ci(r["ci_low"], r["ci_high"]), fmt_p(r["p_value"])] for r in df.iter_rows(named=True)]
    return (["condition", "alpha", "n", "mean diff vs noop", "95% CI", "p (unadjusted)"], rows)


def peaks_table(pk: pl.DataFrame) -> Table:
    df = condition_sorted(pk).sort("_rank")
    rows = [[r["condition"], f"{r['peak_alpha']:g}", fmt(r["peak_mean"]),
             fmt_ci(r["peak_ci_low"], r["peak_ci_high"]), str(r["n_alphas"])]
            for r in df.iter_rows(named=True)]
    return (["condition", "peak alpha", "mean at peak", "95% CI", "alphas swept"], rows)


def frame_table(df: pl.DataFrame) -> Table:
    """Any polars frame as a table (floats signed to 3 decimals)."""
    rows = [[fmt(v, "+.3f") if isinstance(v, float) else ("" if v is None else str(v))
             for v in r] for r in df.iter_rows()]
    return (list(df.columns), rows)
