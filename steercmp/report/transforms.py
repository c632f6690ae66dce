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


def dose_frame(relative: pl.DataFrame) -> pl.DataFrame:
    """Paired effect vs noop (condition − noop, mean and CI over prompts) per panel, condition
    and alpha, from :func:`steercmp.stats.relative_to_noop`. Paired, because the 3-nat spread
    between prompts would otherwise hide effects of 0.02-0.5."""
    return relative.filter(pl.col("mean_diff").is_not_null()).with_columns(
        panel_label(), pl.col("mean_diff").alias("mean")
    ).select("panel", "method", "scaling", "condition", "alpha", "n", "mean", "ci_low", "ci_high")


def heatmap_frame(heterogeneity: pl.DataFrame, alphas: Sequence[float] | None) -> pl.DataFrame:
    """Per-prompt effect vs noop (condition score − the prompt's noop score, same method,
    scaling and alpha) at the given alphas; ``prompt`` reads ``id [selection]``."""
    keys = ["prompt_id", "method", "scaling", "alpha"]
    het = heterogeneity.filter(_alpha_in(alphas))
    noop = het.filter(pl.col("condition") == "noop").select(*keys, pl.col("score").alias("_noop"))
    return het.filter(pl.col("condition") != "noop").join(noop, on=keys, how="left").with_columns(
        panel_label(),
        pl.concat_str([pl.col("prompt_id"), pl.lit(" ["),
                       pl.col("selection").fill_null("?"), pl.lit("]")]).alias("prompt"),
        pl.format("α={}", pl.col("alpha")).alias("alpha_label"),
        (pl.col("score") - pl.col("_noop")).alias("effect"),
    ).select("panel", "prompt", "prompt_id", "selection", "condition", "alpha", "alpha_label",
             "effect")


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
    n_boot: int = 2_000,
    seed: int = 0,
) -> pl.DataFrame:
    """Target-edit effect vs noop against the injected norm ``delta_norm * |alpha|`` per method.

    ``methods`` defaults to every method with a non-zero delta (activation methods). Uses
    ``raw`` scaling rows when there are any (there the injected norm is exactly
    ``delta_norm * |alpha|``), else all rows. One row per method, scaling and alpha: mean
    injected norm, mean paired effect (target_edit − noop) and its percentile bootstrap CI.
    """
    from steercmp.stats import bootstrap_mean_ci, effects_vs_noop
    from steercmp.stats.summary import usable

    schema = {"method": pl.String, "scaling": pl.String, "alpha": pl.Float64, "injected_norm": pl.Float64,
              "mean": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64, "n": pl.Int64}
    if methods is None:
        methods = cells.filter(pl.col("delta_norm") > 0)["method"].unique().sort().to_list()
    df = cells.filter(pl.col("method").is_in(list(methods)))
    if (df["scaling"] == "raw").any():
        df = df.filter(pl.col("scaling") == "raw")
    target = df.filter((pl.col("condition") == "target_edit") & usable(df) & pl.col("delta_norm").is_not_null()
                       & (pl.col("delta_norm") * pl.col("alpha").abs()).is_finite())
    if target.is_empty():
        return pl.DataFrame(schema=schema)
    norms = target.group_by("method", "scaling", "alpha").agg(
        (pl.col("delta_norm") * pl.col("alpha").abs()).mean().alias("injected_norm"))
    rows = []
    for (m, sc, a), grp in effects_vs_noop(df).group_by("method", "scaling", "alpha", maintain_order=True):
        eff = grp["effect"].to_numpy()
        lo, hi = bootstrap_mean_ci(eff, n_boot=n_boot, seed=seed)
        rows.append({"method": m, "scaling": sc, "alpha": a, "mean": float(eff.mean()), "ci_low": lo,
                     "ci_high": hi, "n": len(eff)})
    if not rows:
        return pl.DataFrame(schema=schema)
    effects = pl.DataFrame(rows, schema={k: schema[k] for k in ("method", "scaling", "alpha", "mean", "ci_low",
                                                                 "ci_high", "n")})
    return norms.join(effects, on=["method", "scaling", "alpha"]).sort(
        "method", "scaling", "injected_norm").select(list(schema))
