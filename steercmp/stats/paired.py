"""Paired comparisons, target minus control per prompt: bootstrap CIs, one-sided exact
sign-flip tests and what the test could detect at that number of prompts.

No correction across the controls: the claim "the target beats EVERY control" is an
intersection-union test (Berger 1982), whose error is already at most the level when every
per-control test runs at that level (docs/statistics.md)."""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import polars as pl

from steercmp.stats._core import EXACT_MAX_N, bootstrap_mean_ci, sign_flip_pvalue
from steercmp.stats.power import min_p_value, minimum_detectable_effect, prompts_for_power
from steercmp.stats.summary import PRIMARY, per_prompt_hits, usable

TARGET = "target_edit"
CONTROLS: tuple[str, ...] = ("noop", "unrelated_edit", "random_delta", "wrong_position")
PAIRED_SCHEMA = {
    "method": pl.String,
    "scaling": pl.String,
    "alpha": pl.Float64,
    "control": pl.String,
    "n": pl.Int64,
    "mean_diff": pl.Float64,
    "ci_low": pl.Float64,
    "ci_high": pl.Float64,
    "p_value": pl.Float64,
    "exact": pl.Boolean,
    "min_p": pl.Float64,
    "mde": pl.Float64,
    "n_for_power": pl.Int64,
}


@attrs.frozen
class PairedTest:
    """How a paired difference is tested: ``n_boot`` bootstrap resamples for the CI, ``n_perm``
    Monte Carlo sign flips past :data:`EXACT_MAX_N` prompts, the ``seed`` of both, and the
    ``level`` the power columns are computed at."""

    n_boot: int = 10_000
    seed: int = 0
    n_perm: int = 10_000
    level: float = 0.05


def _paired_values(
    frame: pl.DataFrame,
    *,
    target: str,
    controls: Sequence[str],
    value: str,
    subset: str,
    test: PairedTest,
    alternative: str,
    power: bool,
) -> pl.DataFrame:
    n_boot, seed, n_perm, level = test.n_boot, test.seed, test.n_perm, test.level
    keys = ["method", "scaling", "alpha"]
    data = frame.filter(usable(frame, value, subset)).select(*keys, "prompt_id", "condition", value)
    rows: list[dict] = []
    tgt_all = data.filter(pl.col("condition") == target)
    for key, tgt in tgt_all.group_by(keys, maintain_order=True):
        method, scaling, alpha = key
        same = data.filter(
            (pl.col("method") == method) & (pl.col("scaling") == scaling) & (pl.col("alpha") == alpha)
        )
        t = tgt.group_by("prompt_id").agg(pl.col(value).mean().alias("_t"))
        block: list[dict] = []
        for ctrl in controls:
            c = same.filter(pl.col("condition") == ctrl).group_by("prompt_id").agg(
                pl.col(value).mean().alias("_c")
            )
            d = t.join(c, on="prompt_id", how="inner").sort("prompt_id")
            diffs = (d["_t"] - d["_c"]).to_numpy()
            n = int(diffs.shape[0])
            if n == 0:
                block.append(dict(method=method, scaling=scaling, alpha=alpha, control=ctrl, n=0,
                                  mean_diff=None, ci_low=None, ci_high=None, p_value=None,
                                  exact=None, min_p=1.0, mde=None, n_for_power=None))
                continue
            lo, hi = bootstrap_mean_ci(diffs, n_boot=n_boot, seed=seed)
            p, exact = sign_flip_pvalue(diffs, alternative=alternative, n_perm=n_perm, seed=seed)
            extra = dict(min_p=None, mde=None, n_for_power=None)
            if power:
                extra = dict(min_p=min_p_value(n) if exact else 1.0 / (n_perm + 1),
                             mde=minimum_detectable_effect(diffs, level=level, seed=seed),
                             n_for_power=prompts_for_power(diffs, level=level, seed=seed))
            block.append(dict(method=method, scaling=scaling, alpha=alpha, control=ctrl, n=n,
                              mean_diff=float(diffs.mean()), ci_low=lo, ci_high=hi, p_value=p,
                              exact=exact, **extra))
        rows.extend(block)
    return pl.DataFrame(rows, schema=PAIRED_SCHEMA).sort(["method", "scaling", "alpha", "control"])


def paired(
    cells: pl.DataFrame,
    target: str = TARGET,
    controls: Sequence[str] = CONTROLS,
    *,
    value: str = "score",
    subset: str = PRIMARY,
    test: PairedTest = PairedTest(),
) -> pl.DataFrame:
    """Target minus each control, per prompt, for every method, scaling and alpha.

    Only prompts of ``subset`` (``primary``: usable rows that are not fallback or gated;
    ``secondary``: the fallback and gated rows) with a usable value in both conditions enter
    (``n``). ``mean_diff`` is the mean per-prompt difference; ``ci_low``/``ci_high`` a
    percentile bootstrap 95% CI over prompts (``test.n_boot`` resamples); ``p_value`` the
    ONE-SIDED sign-flip p for "target > control" (exact over all 2**n sign patterns, zero
    differences kept, up to ``EXACT_MAX_N`` = 20 prompts; otherwise ``test.n_perm`` seeded Monte
    Carlo draws). Power at
    this n (:mod:`steercmp.stats.power`): ``min_p`` the smallest achievable p, ``mde`` the
    mean difference detected with 80% power at the observed spread (null when no outcome can
    pass), ``n_for_power`` the prompts the observed effect needs for 80% power (null when it
    is not positive or needs more than 4,096).
    """
    return _paired_values(cells, target=target, controls=controls, value=value, subset=subset, test=test,
                          alternative="greater", power=True)


def paired_hits(
    completions: pl.DataFrame,
    target: str = TARGET,
    controls: Sequence[str] = CONTROLS,
    *,
    family: str = "edited",
    subset: str = PRIMARY,
    test: PairedTest = PairedTest(),
) -> pl.DataFrame:
    """The :func:`paired` analysis on completions, prompts as the unit: per prompt, the
    seed-averaged ``hit_<family>`` fraction of the target minus that of each control (seeds are
    nested in prompts; ties stay in the exact test). Same columns."""
    pp = per_prompt_hits(completions, subset=subset)
    col = f"hit_{family}"
    if pp.is_empty() or col not in pp.columns:
        return pl.DataFrame(schema=PAIRED_SCHEMA)
    frame = pp.select("method", "scaling", "condition", "alpha", "prompt_id",
                      pl.col(col).alias("score"))
    return _paired_values(frame, target=target, controls=controls, value="score", subset="all", test=test,
                          alternative="greater", power=True)


def relative_to_noop(
    cells: pl.DataFrame,
    *,
    baseline: str = "noop",
    subset: str = PRIMARY,
    test: PairedTest = PairedTest(),
) -> pl.DataFrame:
    """Every condition's effect relative to the unsteered ``baseline``: per method, scaling,
    alpha and condition, the mean per-prompt (condition - baseline) difference with a
    bootstrap CI and an (unadjusted) sign-flip p-value. Columns: method, scaling, alpha,
    condition, n, mean_diff, ci_low, ci_high, p_value.
    """
    conditions = [c for c in cells["condition"].unique().sort().to_list() if c != baseline]
    parts = []
    for cond in conditions:
        res = _paired_values(cells, target=cond, controls=[baseline], value="score", subset=subset,
                             test=test, alternative="two-sided", power=False)
        parts.append(res.with_columns(pl.lit(cond).alias("condition")))
    cols = ["method", "scaling", "alpha", "condition", "n", "mean_diff", "ci_low", "ci_high",
            "p_value"]
    if not parts:
        return pl.DataFrame(schema={k: (PAIRED_SCHEMA.get(k) or pl.String) for k in cols})
    return pl.concat(parts).select(cols).sort(["method", "scaling", "condition", "alpha"])


__all__ = ["CONTROLS", "EXACT_MAX_N", "TARGET", "PairedTest", "paired", "paired_hits", "relative_to_noop"]
