"""Effects against the unsteered model, and as a share of the positive control's.

A method's *effect* on a prompt is its ``target_edit`` score minus that prompt's ``noop`` score
(the unsteered model) at the same alpha and scaling: a paired difference, free of the 3-nat
spread between prompts. The positive control's effect sets the scale: a method's *fraction* is
its effect over the positive control's, per prompt and overall (ratio of the mean effects).
Methods announce their role in their proposals' ``meta.role`` (``positive_control``, ``ceiling``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import polars as pl

from steercmp.stats._core import bootstrap_mean_ci
from steercmp.stats.summary import usable

POSITIVE_CONTROL, CEILING = "positive_control", "ceiling"
EFFECT_SCHEMA = {"method": pl.String, "scaling": pl.String, "alpha": pl.Float64, "prompt_id": pl.String,
                 "effect": pl.Float64}


def method_roles(cells: pl.DataFrame) -> dict[str, str]:
    """``{method: role}`` read from the target rows' ``meta.role`` (methods without one are absent)."""
    roles: dict[str, str] = {}
    if "meta" not in cells.columns:
        return roles
    for method, meta in cells.filter(pl.col("condition") == "target_edit").select("method", "meta").unique(
            subset="method", keep="first").iter_rows():
        try:
            role = json.loads(meta or "{}").get("role")
        except (TypeError, ValueError):
            role = None
        if isinstance(role, str):
            roles[method] = role
    return roles


def effects_vs_noop(cells: pl.DataFrame, alphas: Sequence[float] | None = None) -> pl.DataFrame:
    """Per method, scaling, alpha and prompt: ``target_edit`` score minus ``noop`` score
    (primary rows only; a prompt needs both)."""
    ok = cells.filter(usable(cells))
    if alphas:
        ok = ok.filter(pl.any_horizontal([(pl.col("alpha") - float(a)).abs() < 1e-9 for a in alphas]))
    keys = ["method", "scaling", "alpha", "prompt_id"]
    target = ok.filter(pl.col("condition") == "target_edit").group_by(keys).agg(pl.col("score").mean().alias("_t"))
    noop = ok.filter(pl.col("condition") == "noop").group_by(keys).agg(pl.col("score").mean().alias("_n"))
    joined = target.join(noop, on=keys, how="inner")
    return joined.select(*keys, (pl.col("_t") - pl.col("_n")).alias("effect")).sort(keys)


def fractions(effects: pl.DataFrame, positive_control: str, *, n_boot: int = 2_000, seed: int = 0) -> pl.DataFrame:
    """Every method's effect as a share of the positive control's (same alpha; the positive
    control's scaling is matched when it has it, else its first), overall and per prompt.

    Columns: method, scaling, alpha, n, mean_effect, ci_low, ci_high, control_effect,
    fraction (ratio of the mean effects), median_prompt_fraction."""
    pc = effects.filter(pl.col("method") == positive_control)
    rows = []
    for (method, scaling, alpha), grp in effects.group_by("method", "scaling", "alpha", maintain_order=True):
        ref = pc.filter(((pl.col("alpha") - alpha).abs() < 1e-9) & (pl.col("scaling") == scaling))
        if ref.is_empty():
            ref = pc.filter((pl.col("alpha") - alpha).abs() < 1e-9)
            ref = ref.filter(pl.col("scaling") == ref["scaling"][0]) if ref.height else ref
        joined = grp.join(ref.select("prompt_id", pl.col("effect").alias("_pc")), on="prompt_id", how="inner")
        eff = grp["effect"].to_numpy()
        lo, hi = bootstrap_mean_ci(eff, n_boot=n_boot, seed=seed)
        pc_mean = float(joined["_pc"].mean()) if joined.height else None
        with np.errstate(divide="ignore", invalid="ignore"):
            per = joined["effect"].to_numpy() / joined["_pc"].to_numpy() if joined.height else np.array([])
        per = per[np.isfinite(per)]
        rows.append({"method": method, "scaling": scaling, "alpha": alpha, "n": len(eff),
                     "mean_effect": float(eff.mean()) if len(eff) else None, "ci_low": lo, "ci_high": hi,
                     "control_effect": pc_mean,
                     "fraction": (float(eff.mean()) / pc_mean if pc_mean else None) if len(eff) else None,
                     "median_prompt_fraction": float(np.median(per)) if len(per) else None})
    return pl.DataFrame(rows, schema={"method": pl.String, "scaling": pl.String, "alpha": pl.Float64, "n": pl.Int64,
                                      "mean_effect": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64,
                                      "control_effect": pl.Float64, "fraction": pl.Float64,
                                      "median_prompt_fraction": pl.Float64}).sort("method", "scaling", "alpha")


def absolute_logmass(cells: pl.DataFrame, alphas: Sequence[float] | None = None) -> pl.DataFrame:
    """Mean absolute family log-masses per method, scaling, condition and alpha (primary rows)."""
    ok = cells.filter(usable(cells))
    if alphas:
        ok = ok.filter(pl.any_horizontal([(pl.col("alpha") - float(a)).abs() < 1e-9 for a in alphas]))
    return (ok.group_by("method", "scaling", "condition", "alpha")
            .agg(pl.len().alias("n"), pl.col("logmass_original").mean(), pl.col("logmass_edited").mean(),
                 pl.col("logmass_unrelated").mean())
            .sort("method", "scaling", "alpha", "condition"))


__all__ = ["CEILING", "POSITIVE_CONTROL", "absolute_logmass", "effects_vs_noop", "fractions", "method_roles"]
