"""The positive control on top: whether the site can be steered at all, and every method's
effect as a share of what a known-working intervention achieves there.

A run names its reference methods through their proposals' ``meta.role``
(:func:`steercmp.stats.method_roles`): the positive control (``counterfactual_patch``) gets a
verdict like any method and is listed first; a ceiling (``counterfactual_text``, the
counterfactual couplet itself) is a row of the reference table, never a verdict, since it is
not an activation intervention.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import polars as pl
import torch

from steercmp import stats
from steercmp.report.sections import Section
from steercmp.report.tables import Table, fmt, fmt_ci
from steercmp.run.proposals import load_proposals
from steercmp.run.rundir import RunDir


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
    roles = stats.method_roles(cells)
    positives = sorted(m for m, r in roles.items() if r == stats.POSITIVE_CONTROL)
    ceilings = tuple(sorted(m for m, r in roles.items() if r == stats.CEILING))
    return roles, (positives[0] if positives else None), ceilings


def order_verdicts(verdicts: list[dict[str, Any]], roles: Mapping[str, str]) -> list[dict[str, Any]]:
    """Each verdict gets its ``role``; positive controls first, the rest in their given order."""
    for v in verdicts:
        v["role"] = roles.get(v["method"])
    return sorted(verdicts, key=lambda v: v["role"] != stats.POSITIVE_CONTROL)


def site_banner(verdicts: Sequence[Mapping[str, Any]], ref: Reference) -> str:
    """The first line a reader sees: can the positive control, or anything tested, steer this site?"""
    positive = ref.positive
    if positive is None:
        return ("No positive control in this run (add the counterfactual_patch method): a 'not supported' "
                "below cannot tell a method that fails from a site that nothing can steer.")
    own = [v for v in verdicts if v["method"] == positive]
    found = {v["verdict"] for v in own}
    label = ", ".join(f"{v['method']} · {v['scaling']}: {v['verdict']}" for v in own)
    wins = {stats.SUPPORTED, stats.SHIFT_ONLY}
    if found & wins:
        return (f"The site can be steered: the positive control ({label}) moves the score here, so a method's "
                f"'not supported' below is a failure of that method, not of the site.")
    if found == {stats.UNDERPOWERED}:
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
                    run: RunDir | None = None) -> Reference:
    _, positive, ceilings = roles_of(cells)
    effects = stats.effects_vs_noop(cells, alphas)
    fractions = (stats.fractions(effects, positive, n_boot=min(n_boot, 2_000), seed=seed) if positive
                 else pl.DataFrame())
    cosines = delta_cosines(run, positive, cells) if run is not None and positive else pl.DataFrame()
    return Reference(positive, ceilings, fractions, effects, stats.absolute_logmass(cells, alphas), cosines)


COSINE_SCHEMA = {"method": pl.String, "prompt_id": pl.String, "status": pl.String, "cosine": pl.Float64,
                 "delta_norm": pl.Float64, "positive_norm": pl.Float64, "chance_band": pl.Float64}


def delta_cosines(run: RunDir, positive: str, cells: pl.DataFrame) -> pl.DataFrame:
    """Per method and prompt: the cosine between the method's target delta and the positive
    control's delta (does the method point where a known-working intervention points?).
    Methods without deltas (prompting) and prompts without a live delta on both sides are left out."""
    methods = sorted(set(cells["method"].unique().to_list()) - {positive})
    try:
        pc = {p.prompt_id: p for p in load_proposals(run, positive) if p.family == "edited"}
    except (OSError, KeyError, ValueError):
        return pl.DataFrame(schema=COSINE_SCHEMA)
    rows = []
    for m in methods:
        if not run.proposal_records(m).is_file():
            continue
        try:
            props = load_proposals(run, m)
        except (OSError, KeyError, ValueError):
            continue
        for p in props:
            ref = pc.get(p.prompt_id)
            if (p.family != "edited" or p.delta is None or p.status == "dropped" or ref is None
                    or ref.delta is None):
                continue
            a, b = p.delta.float(), ref.delta.float()
            if float(a.norm()) == 0.0 or float(b.norm()) == 0.0:
                continue
            rows.append({"method": m, "prompt_id": p.prompt_id, "status": p.status,
                         "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
                         "delta_norm": float(a.norm()), "positive_norm": float(b.norm()),
                         # two standard deviations of the cosine of two random directions in d dims
                         "chance_band": 2.0 / float(a.numel()) ** 0.5})
    return pl.DataFrame(rows, schema=COSINE_SCHEMA)


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


__all__ = ["Reference", "build_reference", "order_verdicts", "reference_section", "roles_of", "site_banner"]
