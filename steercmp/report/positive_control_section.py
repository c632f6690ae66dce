"""The positive control on top: whether the site can be steered at all, and every method's
effect as a share of what a known-working intervention achieves there.

A run names its reference methods through their proposals' ``meta.role``
(:func:`steercmp.stats.method_roles`): the positive control (``counterfactual_patch``) gets a
verdict like any method and is listed first; a ceiling (``counterfactual_text``, the
counterfactual couplet itself) is a row of the reference table, never a verdict, since it is
not an activation intervention.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from steercmp import stats
from steercmp.report.sections import Section
from steercmp.report.text_tables import Table, fmt, fmt_ci
from steercmp.stats.positive_control import Reference


def cosine_table(ref: Reference) -> Table:
    if ref.cosines.is_empty():
        return ([], [])
    df = ref.cosines.group_by("method").agg(
        pl.len().alias("n"), pl.col("cosine").mean().alias("mean"), pl.col("cosine").median().alias("median"),
        pl.col("cosine").min().alias("min"), pl.col("cosine").max().alias("max"),
        (pl.col("delta_norm") / pl.col("positive_norm")).median().alias("norm_ratio"),
        pl.col("chance_band").first().alias("band")).sort("method")
    rows = [[r["method"], str(r["n"]), fmt(r["mean"], ".3f"), fmt(r["median"], ".3f"),
             f"{fmt(r['min'], '.3f')} .. {fmt(r['max'], '.3f')}", f"±{fmt(r['band'], '.3f')}",
             "yes" if abs(r["mean"]) > r["band"] else "no (chance)", fmt(r["norm_ratio"], ".2f")]
            for r in df.iter_rows(named=True)]
    return (["method", "prompts", "mean cosine", "median cosine", "range", "chance band ±2/√d", "beyond chance",
             "median ‖δ‖ / ‖δ_pc‖"], rows)


def _role(method: str, ref: Reference) -> str:
    return ("positive control" if method == ref.positive
            else "ceiling" if method in ref.ceilings else "method")


def fraction_table(ref: Reference) -> Table:
    df = ref.fractions.with_columns(
        pl.col("method").replace_strict({ref.positive: 0} | {c: 1 for c in ref.ceilings}, default=2,
                                        return_dtype=pl.Int64).alias("_rank")
    ).sort("_rank", "method", "scaling", "alpha")
    rows = [[r["method"], _role(r["method"], ref), r["scaling"], f"{r['alpha']:g}", str(r["n"]),
             fmt(r["mean_effect"]), fmt_ci(r["ci_low"], r["ci_high"]), fmt(r["control_effect"]),
             fmt(r["fraction"], ".0%"), fmt(r["median_prompt_fraction"], ".0%")]
            for r in df.iter_rows(named=True)]
    return (["method", "role", "scaling", "alpha", "prompts", "effect vs noop (mean)", "95% CI",
             "positive control's effect", "fraction of positive control", "median per-prompt fraction"], rows)


def prompt_table(ref: Reference, alpha: float) -> Table:
    """Per prompt at one alpha: the positive control's effect, then every other method's effect
    and its fraction of the positive control's (first scaling of each method)."""
    eff = ref.effects.filter((pl.col("alpha") - alpha).abs() < 1e-9)
    if eff.is_empty() or ref.positive is None:
        return ([], [])
    first_scaling = eff.group_by("method").agg(pl.col("scaling").sort().first().alias("_s"))
    eff = eff.join(first_scaling, on="method").filter(pl.col("scaling") == pl.col("_s"))
    wide = eff.pivot(on="method", index="prompt_id", values="effect", aggregate_function="first").sort("prompt_id")
    others = [m for m in [*ref.ceilings, *sorted(set(wide.columns) - {"prompt_id", ref.positive, *ref.ceilings})]
              if m in wide.columns]
    rows = []
    for r in wide.iter_rows(named=True):
        pc = r.get(ref.positive)
        cells = [r["prompt_id"], fmt(pc)]
        for m in others:
            x = r.get(m)
            share = f" ({x / pc:.0%})" if x is not None and pc not in (None, 0) else ""
            cells.append(fmt(x) + share)
        rows.append(cells)
    return (["prompt", f"{ref.positive} (positive control)", *others], rows)


def logmass_table(ref: Reference) -> Table:
    df = ref.logmass.filter(pl.col("condition").is_in(["noop", stats.TARGET]))
    rows = [[r["method"], r["scaling"], f"{r['alpha']:g}", r["condition"], str(r["n"]),
             fmt(r["logmass_original"], ".3f"), fmt(r["logmass_edited"], ".3f"), fmt(r["logmass_unrelated"], ".3f")]
            for r in df.iter_rows(named=True)]
    return (["method", "scaling", "alpha", "condition", "prompts", "log-mass original", "log-mass edited",
             "log-mass unrelated"], rows)


def reference_section(ref: Reference, alphas: Sequence[float]) -> Section:
    if ref.positive is None:
        return Section("Against the positive control", None, [("absolute family log-masses", logmass_table(ref))],
                       "no positive control in this run (add counterfactual_patch); absolute family "
                       "log-masses at the decision alphas below.")
    tables = [("effect vs noop at the decision alphas, as a share of the positive control",
               fraction_table(ref))]
    tables += [(f"per prompt at α={a:g}: effect vs noop (share of the positive control)", prompt_table(ref, a))
               for a in alphas]
    if not ref.cosines.is_empty():
        tables.append((f"direction: cosine of each method's target delta with {ref.positive}'s delta, per prompt",
                       cosine_table(ref)))
    tables.append(("absolute family log-masses (mean over prompts)", logmass_table(ref)))
    ceiling = (f" The ceiling row ({', '.join(ref.ceilings)}) scores the counterfactual couplet itself: how far "
               f"any intervention at any site could move the score." if ref.ceilings else
               " No ceiling row (add counterfactual_text to see how far the full counterfactual text moves it).")
    return Section(
        "Against the positive control", None, tables,
        f"effect = target_edit score − noop score per prompt (paired; same alpha and scaling). "
        f"{ref.positive} patches the counterfactual couplet's residual at the experiment's layer and "
        f"injection position (at alpha 1 with raw scaling it is activation patching). fraction = mean effect "
        f"over the positive control's mean effect on the same prompts.{ceiling}")


__all__ = ["reference_section"]
