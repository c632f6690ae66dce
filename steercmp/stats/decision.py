"""The pre-declared decision rule: one verdict per method and scaling."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl

from steercmp.stats.paired import CONTROLS

SUPPORTED = "causal claim supported"
SHIFT_ONLY = "probability shift only"
NOT_SUPPORTED = "not supported"
METRICS = ("logmass", "completions")


def _fmt(x: float | None) -> str:
    return "NA" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def _check(row: dict | None, *, level: float, metric: str, alpha: float, control: str) -> dict:
    base: dict[str, Any] = dict(metric=metric, alpha=alpha, control=control, n=0, mean_diff=None,
                                ci_low=None, ci_high=None, p_value=None, p_holm=None)
    if row is None or not row.get("n"):
        what = "no completions" if metric == "completions" else "no paired prompts"
        return base | dict(passed=False, reason=f"{what} for target vs {control} at alpha {alpha:g}")
    base.update({k: row.get(k) for k in ("n", "mean_diff", "ci_low", "ci_high", "p_value", "p_holm")})
    why = []
    p = row.get("p_holm")
    if p is None or math.isnan(p) or p >= level:
        why.append(f"Holm p={_fmt(p)} >= {level:g}")
    lo, hi = row.get("ci_low"), row.get("ci_high")
    if lo is None or hi is None or math.isnan(lo) or lo <= 0:
        why.append(f"95% CI [{_fmt(lo)}, {_fmt(hi)}] does not exclude 0 on the positive side")
    if row.get("mean_diff") is None or row["mean_diff"] <= 0:
        why.append(f"mean difference {_fmt(row.get('mean_diff'))} <= 0")
    return base | dict(passed=not why, reason="; ".join(why) if why else "passed")


def verdict(
    paired_score: pl.DataFrame,
    paired_completions: pl.DataFrame | None,
    *,
    decision_alphas: Sequence[float],
    controls: Sequence[str] = CONTROLS,
    level: float = 0.05,
    methods: Sequence[tuple[str, str]] | None = None,
    not_applicable: Mapping[str, Sequence[str]] | None = None,
) -> list[dict[str, Any]]:
    """Apply the decision rule to paired tables from :func:`steercmp.stats.paired` (logmass
    score) and :func:`steercmp.stats.paired_hits` (edited-family completion hits).

    For each (method, scaling) — from ``methods`` or from ``paired_score`` — the target "wins"
    a metric iff at EVERY alpha in ``decision_alphas`` it beats EVERY control in ``controls``:
    Holm-adjusted p < ``level``, bootstrap CI lower bound > 0 and mean difference > 0. A missing
    control or metric at a decision alpha counts as a loss. Verdict: ``"causal claim
    supported"`` if it wins on both metrics, ``"probability shift only"`` if it wins on logmass
    only (including when there are no completions), ``"not supported"`` otherwise. The alphas
    are taken as given; this function never searches for a favourable alpha.

    Returns JSON-ready dicts: method, scaling, verdict, decision_alphas, controls, level,
    logmass_wins, completions_wins, failures (checks that failed, each with metric, alpha,
    control, n, mean_diff, ci_low, ci_high, p_value, p_holm, reason), checks (all), explanation.

    ``not_applicable`` maps a method to controls that make no sense for it (e.g. wrong_position
    for a prompting baseline, whose cells say ``not_applicable``): those are left out of its rule
    and listed under ``controls_not_applicable``, never counted as wins.
    """
    if not decision_alphas:
        raise ValueError("decision_alphas must name at least one pre-declared alpha")
    alphas = [float(a) for a in decision_alphas]
    if methods is None:
        methods = sorted(
            {(r["method"], r["scaling"]) for r in paired_score.select("method", "scaling").to_dicts()}
        )
    tables = {"logmass": paired_score, "completions": paired_completions}
    out = []
    for method, scaling in methods:
        checks: list[dict] = []
        skipped = sorted(set((not_applicable or {}).get(method, ())) & set(controls))
        for metric in METRICS:
            table = tables[metric]
            for a in alphas:
                for ctrl in controls:
                    if ctrl in skipped:
                        continue
                    row = None
                    if table is not None and not table.is_empty():
                        hit = table.filter(
                            (pl.col("method") == method) & (pl.col("scaling") == scaling)
                            & ((pl.col("alpha") - a).abs() < 1e-9) & (pl.col("control") == ctrl)
                        )
                        row = hit.row(0, named=True) if hit.height else None
                    checks.append(_check(row, level=level, metric=metric, alpha=a, control=ctrl))
        wins = {m: all(c["passed"] for c in checks if c["metric"] == m) for m in METRICS}
        if wins["logmass"] and wins["completions"]:
            v = SUPPORTED
        elif wins["logmass"]:
            v = SHIFT_ONLY
        else:
            v = NOT_SUPPORTED
        failures = [c for c in checks if not c["passed"]]
        alist = ", ".join(f"{a:g}" for a in alphas)
        if v == SUPPORTED:
            expl = f"target beats every control on logmass and completions at alpha {alist}"
        else:
            by_metric = []
            for m in METRICS:
                failed = [c for c in failures if c["metric"] == m]
                if failed and all(c["n"] == 0 for c in failed) and m == "completions":
                    by_metric.append("completions: no edited-family completion data")
                elif failed:
                    names = sorted({c["control"] for c in failed}, key=list(controls).index)
                    by_metric.append(f"{m}: fails vs {', '.join(names)}")
            expl = f"at alpha {alist}: " + "; ".join(by_metric)
        out.append(dict(method=method, scaling=scaling, verdict=v, decision_alphas=alphas,
                        controls=[c for c in controls if c not in skipped],
                        controls_not_applicable=skipped, level=level, logmass_wins=wins["logmass"],
                        completions_wins=wins["completions"], explanation=expl,
                        failures=failures, checks=checks))
    return out
