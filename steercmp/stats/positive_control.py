"""Effects against the unsteered model, and as a share of the positive control's.

A method's *effect* on a prompt is its ``target_edit`` score minus that prompt's ``noop`` score
(the unsteered model) at the same alpha and scaling: a paired difference, free of the 3-nat
spread between prompts. The positive control's effect sets the scale: a method's *fraction* is
its effect over the positive control's, per prompt and overall (ratio of the mean effects).
Methods announce their role in their proposals' ``meta.role`` (``positive_control``, ``ceiling``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import numpy as np
import polars as pl

from steercmp.stats._core import bootstrap_mean_ci
from steercmp.stats.decision import SHIFT_ONLY, SUPPORTED, UNDERPOWERED
from steercmp.stats.format import fmt, fmt_ci
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




@attrs.frozen
class Reference:
    """The run's reference methods and the frames the report writes and shows."""

    positive: str | None
    ceilings: tuple[str, ...]
    fractions: pl.DataFrame
    effects: pl.DataFrame
    logmass: pl.DataFrame
    cosines: pl.DataFrame = attrs.field(factory=pl.DataFrame)


def roles_of(cells: pl.DataFrame) -> tuple[dict[str, str], str | None, tuple[str, ...]]:
    """``(roles, positive control or None, ceilings)``; with several positive controls the first
    by name is the reference."""
    roles = method_roles(cells)
    positives = sorted(m for m, r in roles.items() if r == POSITIVE_CONTROL)
    ceilings = tuple(sorted(m for m, r in roles.items() if r == CEILING))
    return roles, (positives[0] if positives else None), ceilings


def order_verdicts(verdicts: list[dict[str, Any]], roles: Mapping[str, str]) -> list[dict[str, Any]]:
    """Each verdict gets its ``role``; positive controls first, the rest in their given order."""
    for v in verdicts:
        v["role"] = roles.get(v["method"])
    return sorted(verdicts, key=lambda v: v["role"] != POSITIVE_CONTROL)


def site_banner(verdicts: Sequence[Mapping[str, Any]], ref: Reference) -> str:
    """The first line a reader sees: can the positive control, or anything tested, steer this site?"""
    positive = ref.positive
    if positive is None:
        return ("No positive control in this run (add the counterfactual_patch method): a 'not supported' "
                "below cannot tell a method that fails from a site that nothing can steer.")
    own = [v for v in verdicts if v["method"] == positive]
    found = {v["verdict"] for v in own}
    label = ", ".join(f"{v['method']} · {v['scaling']}: {v['verdict']}" for v in own)
    wins = {SUPPORTED, SHIFT_ONLY}
    if found & wins:
        return (f"The site can be steered: the positive control ({label}) moves the score here, so a method's "
                f"'not supported' below is a failure of that method, not of the site.")
    if found == {UNDERPOWERED}:
        return (f"Cannot tell whether this site can be steered: the positive control ({label}) is underpowered "
                f"at this battery's size. Read every verdict below as inconclusive about the site.")
    lost = sorted({c["control"] for v in own for c in v["failures"] if c["metric"] == "logmass"})
    why = f"; its logmass score loses to {', '.join(lost)}" if lost else ""
    moved = ""
    if not ref.fractions.is_empty():
        row = ref.fractions.filter(pl.col("method") == positive).sort("scaling", "alpha").head(1)
        if row.height and row["mean_effect"][0] is not None:
            r = row.row(0, named=True)
            moved = (f", although against noop it moves the score by {fmt(r['mean_effect'])} "
                     f"{fmt_ci(r['ci_low'], r['ci_high'])} at alpha {r['alpha']:g}")
    others = [f"{v['method']} · {v['scaling']}" for v in verdicts if v["method"] != positive and v["verdict"] in wins]
    if others:
        return (f"The positive control does not win here ({label}{why}){moved}. Other methods do win "
                f"({', '.join(others)}): the site can be steered, and at this site the positive control is not "
                f"a sufficient reference; read each verdict against the controls it names.")
    return (f"The site cannot be steered by anything tested: the positive control ({label}{why}) does not win "
            f"here{moved}. Every verdict below is read against that: a method's 'not supported' says nothing "
            f"about the method.")


def build_reference(cells: pl.DataFrame, alphas: Sequence[float], *, n_boot: int, seed: int,
                    cosines: pl.DataFrame | None = None) -> Reference:
    """The run's reference methods, every method's effect against noop and as a share of the
    positive control's, the absolute log-masses, and ``cosines`` (read from the run's proposals
    by the caller: :func:`steercmp.run.analyse.delta_cosines`)."""
    _, positive, ceilings = roles_of(cells)
    effects = effects_vs_noop(cells, alphas)
    shares = fractions(effects, positive, n_boot=min(n_boot, 2_000), seed=seed) if positive else pl.DataFrame()
    return Reference(positive, ceilings, shares, effects, absolute_logmass(cells, alphas),
                     cosines if cosines is not None and positive else pl.DataFrame())


__all__ = ["CEILING", "POSITIVE_CONTROL", "Reference", "absolute_logmass", "build_reference", "effects_vs_noop",
           "fractions", "method_roles", "order_verdicts", "roles_of", "site_banner"]
