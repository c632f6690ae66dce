"""Layer 1 of the report: polars transforms that shape statistics into small chart frames.

Every function returns an aggregated frame (one row per mark), never raw per-sample rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl


def panel_label() -> pl.Expr:
    """``"method · scaling"``: the facet label used by every chart."""
    return pl.concat_str([pl.col("method"), pl.lit(" · "), pl.col("scaling")]).alias("panel")


def _alpha_in(alphas: Sequence[float] | None) -> pl.Expr:
    if not alphas:
        return pl.lit(True)
    return pl.any_horizontal([(pl.col("alpha") - float(a)).abs() < 1e-9 for a in alphas])


def dose_frame(summary: pl.DataFrame) -> pl.DataFrame:
    """Mean score and CI per panel, condition and alpha, with ``is_peak`` from dose-response."""
    from steercmp.stats import dose_response

    return dose_response(summary).filter(pl.col("mean").is_not_null()).with_columns(
        panel_label()
    ).select("panel", "method", "scaling", "condition", "alpha", "n", "mean", "median",
             "ci_low", "ci_high", "is_peak")


def heatmap_frame(heterogeneity: pl.DataFrame, alphas: Sequence[float] | None) -> pl.DataFrame:
    """Per-prompt scores at the given alphas; ``prompt`` reads ``id [selection]``."""
    return heterogeneity.filter(_alpha_in(alphas)).with_columns(
        panel_label(),
        pl.concat_str([pl.col("prompt_id"), pl.lit(" ["),
                       pl.col("selection").fill_null("?"), pl.lit("]")]).alias("prompt"),
        pl.format("α={}", pl.col("alpha")).alias("alpha_label"),
    ).select("panel", "prompt", "prompt_id", "selection", "condition", "alpha", "alpha_label",
             "score")


def forest_frame(
    paired_score: pl.DataFrame,
    paired_completions: pl.DataFrame | None,
    alphas: Sequence[float] | None,
    *,
    level: float = 0.05,
) -> pl.DataFrame:
    """Paired effects (target - control) of both metrics at the given alphas, one row each,
    with ``wins`` (one-sided p < level, CI above 0, mean above 0) and a ``row`` label ``control @ α``."""
    parts = [paired_score.with_columns(pl.lit("logmass score").alias("metric"))]
    if paired_completions is not None and not paired_completions.is_empty():
        parts.append(paired_completions.with_columns(
            pl.lit("edited-family hit rate").alias("metric")))
    df = pl.concat(parts, how="diagonal_relaxed").filter(
        _alpha_in(alphas) & pl.col("mean_diff").is_not_null()
    )
    return df.with_columns(
        panel_label(),
        pl.format("{} @ α={}", pl.col("control"), pl.col("alpha")).alias("row"),
        ((pl.col("p_value") < level) & (pl.col("ci_low") > 0) & (pl.col("mean_diff") > 0))
        .fill_null(False).alias("wins"),
    ).select("panel", "metric", "control", "alpha", "row", "n", "mean_diff", "ci_low",
             "ci_high", "p_value", "min_p", "wins")


def hits_frame(hit_rates: pl.DataFrame) -> pl.DataFrame:
    """Completion hit rates with CIs per panel, condition, alpha and family."""
    return hit_rates.with_columns(
        panel_label(), pl.format("α={}", pl.col("alpha")).alias("alpha_label")
    ).select("panel", "condition", "alpha", "alpha_label", "family", "n_prompts",
             "n_completions", "rate", "ci_low", "ci_high")


def matched_norm_frame(
    cells: pl.DataFrame,
    *,
    methods: Sequence[str] | None = None,
    condition: str = "target_edit",
    n_boot: int = 2_000,
    seed: int = 0,
) -> pl.DataFrame:
    """Target-edit score against the injected norm ``delta_norm * |alpha|`` per method.

    ``methods`` defaults to every method with a non-zero delta (activation methods). Uses
    ``raw`` scaling rows when there are any (there the injected norm is exactly
    ``delta_norm * |alpha|``), else all rows. One row per method, scaling and alpha: mean
    injected norm, mean score and its percentile bootstrap CI over prompts.
    """
    from steercmp.stats import summarize
    from steercmp.stats.summary import usable

    if methods is None:
        methods = cells.filter(pl.col("delta_norm") > 0)["method"].unique().sort().to_list()
    df = cells.filter(pl.col("method").is_in(list(methods)) & (pl.col("condition") == condition))
    if (df["scaling"] == "raw").any():
        df = df.filter(pl.col("scaling") == "raw")
    df = df.filter(usable(df) & pl.col("delta_norm").is_not_null()
                   & (pl.col("delta_norm") * pl.col("alpha").abs()).is_finite())
    if df.is_empty():
        return pl.DataFrame(schema={"method": pl.String, "scaling": pl.String,
                                    "alpha": pl.Float64, "injected_norm": pl.Float64,
                                    "mean": pl.Float64, "ci_low": pl.Float64,
                                    "ci_high": pl.Float64, "n": pl.Int64})
    norms = df.group_by("method", "scaling", "alpha").agg(
        (pl.col("delta_norm") * pl.col("alpha").abs()).mean().alias("injected_norm")
    )
    stats = summarize(df, n_boot=n_boot, seed=seed).select(
        "method", "scaling", "alpha", "mean", "ci_low", "ci_high", "n")
    return norms.join(stats, on=["method", "scaling", "alpha"]).sort(
        "method", "scaling", "injected_norm").select(
        "method", "scaling", "alpha", "injected_norm", "mean", "ci_low", "ci_high", "n")
