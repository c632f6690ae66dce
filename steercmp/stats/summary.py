"""Descriptive statistics over ``cells.parquet`` and ``completions.parquet`` frames.

Prompts are the unit of analysis everywhere: a bootstrap resamples prompts, and completion
hit rates first average the seeds within each prompt.
"""

from __future__ import annotations

import polars as pl

from steercmp.stats._core import bootstrap_mean_ci

GROUP = ("method", "scaling", "condition", "alpha")
#: Row statuses that never enter a statistic (their score is null by contract anyway).
EXCLUDED_STATUSES = ("dropped", "not_applicable", "error")
#: Row statuses reported apart and never in the primary analysis: a text-edit method's prompts
#: whose explanation names no editable term, or whose reconstruction fell below the fidelity gate.
SECONDARY_STATUSES = ("fallback", "below_fidelity")
PRIMARY, SECONDARY, ALL = "primary", "secondary", "all"
FAMILIES = ("original", "edited", "unrelated")

SUMMARY_SCHEMA = {
    "method": pl.String,
    "scaling": pl.String,
    "condition": pl.String,
    "alpha": pl.Float64,
    "n": pl.Int64,
    "n_excluded": pl.Int64,
    "mean": pl.Float64,
    "median": pl.Float64,
    "n_positive": pl.Int64,
    "ci_low": pl.Float64,
    "ci_high": pl.Float64,
}


def in_subset(frame: pl.DataFrame, subset: str = PRIMARY) -> pl.Expr:
    """Expression: the row's status belongs to ``subset`` (``primary``: not excluded and not
    secondary; ``secondary``: fallback or gated; ``all``: not excluded)."""
    if "status" not in frame.columns:
        return pl.lit(subset != SECONDARY)
    status = pl.col("status")
    ok = ~status.is_in(list(EXCLUDED_STATUSES)).fill_null(False)
    if subset == PRIMARY:
        return ok & ~status.is_in(list(SECONDARY_STATUSES)).fill_null(False)
    if subset == SECONDARY:
        return status.is_in(list(SECONDARY_STATUSES)).fill_null(False)
    if subset == ALL:
        return ok
    raise ValueError(f"subset must be {PRIMARY}, {SECONDARY} or {ALL}, not {subset!r}")


def usable(frame: pl.DataFrame, value: str = "score", subset: str = PRIMARY) -> pl.Expr:
    """Expression: the row has a finite ``value`` and its status belongs to ``subset``."""
    ok = pl.col(value).is_not_null() & pl.col(value).is_finite().fill_null(False)
    return ok & in_subset(frame, subset)


def _sort(frame: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    return frame.sort([k for k in keys if k in frame.columns])


def summarize(cells: pl.DataFrame, *, n_boot: int = 10_000, seed: int = 0,
              subset: str = PRIMARY) -> pl.DataFrame:
    """Per method, scaling, condition and alpha: n, mean, median, positive count and a 95% CI.

    The CI is a percentile bootstrap over prompts: ``n_boot`` resamples of the prompts' scores
    (with replacement) from ``numpy.random.default_rng(seed)``, the 2.5th and 97.5th
    percentiles of the resampled means (same draws as ``scipy.stats.bootstrap`` with
    ``method="percentile"``). Every group uses the same ``seed``, so a group's CI does not
    depend on which other groups exist. Rows whose ``score`` is null/non-finite or whose status
    is outside ``subset`` (by default the primary analysis: not dropped, not_applicable,
    error, fallback or below_fidelity) are left out and counted in ``n_excluded``.
    ``n_positive`` counts scores strictly above 0.
    """
    rows: list[dict] = []
    ok = usable(cells, subset=subset)
    flagged = cells.with_columns(ok.alias("_ok"))
    for key, grp in flagged.group_by(list(GROUP), maintain_order=True):
        vals = grp.filter(pl.col("_ok"))["score"].to_numpy()
        lo, hi = bootstrap_mean_ci(vals, n_boot=n_boot, seed=seed)
        n = int(vals.shape[0])
        rows.append(
            dict(
                zip(GROUP, key, strict=True),
                n=n,
                n_excluded=int(grp.height - n),
                mean=float(vals.mean()) if n else None,
                median=float(pl.Series(vals).median()) if n else None,  # type: ignore[arg-type]
                n_positive=int((vals > 0).sum()),
                ci_low=lo if n else None,
                ci_high=hi if n else None,
            )
        )
    return _sort(pl.DataFrame(rows, schema=SUMMARY_SCHEMA), list(GROUP))


def per_prompt_hits(completions: pl.DataFrame, subset: str = PRIMARY) -> pl.DataFrame:
    """Seed-averaged hit fraction per prompt, method, scaling, condition and alpha.

    Columns: the group keys, ``prompt_id``, ``n_seeds`` and ``hit_original``/``hit_edited``/
    ``hit_unrelated`` as fractions in [0, 1]. Rows with an excluded status or null hits are
    dropped first.
    """
    hit_cols = [f"hit_{f}" for f in FAMILIES if f"hit_{f}" in completions.columns]
    frame = completions
    if "status" in frame.columns:
        frame = frame.filter(in_subset(frame, subset))
    frame = frame.filter(pl.all_horizontal([pl.col(c).is_not_null() for c in hit_cols]))
    return _sort(
        frame.group_by([*GROUP, "prompt_id"]).agg(
            pl.len().alias("n_seeds").cast(pl.Int64),
            *[pl.col(c).cast(pl.Float64).mean() for c in hit_cols],
        ),
        [*GROUP, "prompt_id"],
    )


def hit_rates(completions: pl.DataFrame, *, n_boot: int = 10_000, seed: int = 0,
              subset: str = PRIMARY) -> pl.DataFrame:
    """Completion hit rates per method, scaling, condition, alpha and family, with 95% CIs.

    Prompts are the unit: each prompt's hits are first averaged over its seeds, the rate is
    the mean of those per-prompt fractions, and the CI is a percentile bootstrap over prompts
    (as in :func:`summarize`; not Wilson, whose binomial model would treat seeds of one prompt
    as independent). Columns: method, scaling, condition, alpha, family, n_prompts,
    n_completions, n_excluded, rate, ci_low, ci_high.
    """
    schema = {
        "method": pl.String, "scaling": pl.String, "condition": pl.String, "alpha": pl.Float64,
        "family": pl.String, "n_prompts": pl.Int64, "n_completions": pl.Int64,
        "n_excluded": pl.Int64, "rate": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64,
    }
    per_prompt = per_prompt_hits(completions, subset=subset)
    totals = completions.group_by(list(GROUP)).agg(pl.len().alias("_total").cast(pl.Int64))
    rows: list[dict] = []
    for key, grp in per_prompt.group_by(list(GROUP), maintain_order=True):
        n_used = int(grp["n_seeds"].sum())
        total = totals.filter(
            pl.all_horizontal([pl.col(k) == v for k, v in zip(GROUP, key, strict=True)])
        )["_total"]
        for fam in FAMILIES:
            col = f"hit_{fam}"
            if col not in grp.columns:
                continue
            vals = grp[col].to_numpy()
            lo, hi = bootstrap_mean_ci(vals, n_boot=n_boot, seed=seed)
            rows.append(
                dict(
                    zip(GROUP, key, strict=True),
                    family=fam,
                    n_prompts=int(vals.shape[0]),
                    n_completions=n_used,
                    n_excluded=int(total[0]) - n_used if total.len() else 0,
                    rate=float(vals.mean()),
                    ci_low=lo,
                    ci_high=hi,
                )
            )
    return _sort(pl.DataFrame(rows, schema=schema), [*GROUP, "family"])


def peaks(summary: pl.DataFrame) -> pl.DataFrame:
    """Where each method/scaling/condition's mean score peaks over alpha (descriptive only).

    Columns: method, scaling, condition, peak_alpha, peak_mean, peak_ci_low, peak_ci_high,
    n_alphas. Ties go to the smallest |alpha|. This never feeds the decision rule, whose alphas
    are pre-declared.
    """
    keys = ["method", "scaling", "condition"]
    s = summary.filter(pl.col("mean").is_not_null()).with_columns(
        pl.col("alpha").abs().alias("_abs")
    )
    return _sort(
        s.sort(["mean", "_abs"], descending=[True, False])
        .group_by(keys, maintain_order=True)
        .agg(
            pl.col("alpha").first().alias("peak_alpha"),
            pl.col("mean").first().alias("peak_mean"),
            pl.col("ci_low").first().alias("peak_ci_low"),
            pl.col("ci_high").first().alias("peak_ci_high"),
            pl.len().alias("n_alphas").cast(pl.Int64),
        ),
        keys,
    )


def dose_response(summary: pl.DataFrame) -> pl.DataFrame:
    """Score against alpha with CI bands: the summary rows plus ``peak_alpha`` and ``is_peak``."""
    pk = peaks(summary).select("method", "scaling", "condition", "peak_alpha")
    return _sort(
        summary.join(pk, on=["method", "scaling", "condition"], how="left").with_columns(
            (pl.col("alpha") == pl.col("peak_alpha")).fill_null(False).alias("is_peak")
        ),
        list(GROUP),
    )


def heterogeneity(cells: pl.DataFrame, *, target: str = "target_edit") -> pl.DataFrame:
    """Per-prompt table (long): prompt_id, method, scaling, alpha, condition, score, status,
    and ``selection`` = the status of that prompt's ``target`` row (e.g. editable / fallback /
    dropped for the NLA method). Excluded rows keep a null score.
    """
    keys = ["prompt_id", "method", "scaling", "alpha"]
    sel = cells.filter(pl.col("condition") == target).select(
        *keys, pl.col("status").alias("selection")
    ).unique(subset=keys, keep="first")
    frame = cells.with_columns(
        pl.when(usable(cells, subset=ALL)).then(pl.col("score")).otherwise(None).alias("score")
    ).select(*keys, "condition", "score", "status")
    return _sort(
        frame.join(sel, on=keys, how="left"),
        ["method", "scaling", "alpha", "prompt_id", "condition"],
    )


def heterogeneity_table(
    cells: pl.DataFrame, *, method: str, scaling: str, alpha: float, target: str = "target_edit"
) -> pl.DataFrame:
    """Wide prompt x condition table for one method, scaling and alpha, with ``selection``."""
    long = heterogeneity(cells, target=target).filter(
        (pl.col("method") == method)
        & (pl.col("scaling") == scaling)
        & ((pl.col("alpha") - alpha).abs() < 1e-9)
    )
    if long.is_empty():
        return pl.DataFrame({"prompt_id": [], "selection": []}, schema={"prompt_id": pl.String, "selection": pl.String})
    wide = long.pivot(on="condition", index=["prompt_id", "selection"], values="score", aggregate_function="first")
    return wide.sort("prompt_id")
