"""The pre-declared decision rule: an intersection-union test per method, metric and alpha.

A method WINS a metric iff, at every decision alpha and for EVERY applicable control, the
one-sided exact sign-flip p of "target > control" is below the level, the bootstrap CI of the
mean difference lies above 0 and the mean difference is positive. The claim's null is the union
of the per-control nulls, so testing each at the level controls the claim's error at the level
(Berger 1982, intersection-union test): no correction across controls. A correction across
METHODS (``correction="holm"``) is an option for a reader who asks "does any method work?".

Verdicts: ``causal claim supported`` (logmass and completions win), ``probability shift only``
(logmass wins; completions lose, are missing or cannot reach the level), ``not supported``
(logmass loses although it could have won, or a control has no data), ``underpowered`` (no
logmass outcome could reach the level at this number of usable prompts, zero included: the
honest answer is "cannot tell", never "no").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl

from steercmp.decision_settings import CORRECTIONS
from steercmp.stats._core import holm
from steercmp.stats.paired import CONTROLS
from steercmp.stats.power import prompts_to_reach

SUPPORTED = "causal claim supported"
SHIFT_ONLY = "probability shift only"
NOT_SUPPORTED = "not supported"
UNDERPOWERED = "underpowered"
METRICS = ("logmass", "completions")


def _fmt(x: float | None) -> str:
    return "NA" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _check(row: Mapping[str, Any] | None, *, level: float, metric: str, alpha: float, control: str) -> dict:
    base: dict[str, Any] = dict(metric=metric, alpha=alpha, control=control, n=0, mean_diff=None,
                                ci_low=None, ci_high=None, p_value=None, min_p=1.0, mde=None,
                                n_for_power=None, p_adjusted=None)
    if row is None or not row.get("n"):
        what = "no completions" if metric == "completions" else "no paired prompts"
        return base | dict(passed=False, reachable=False,
                           reason=f"{what} for target vs {control} at alpha {alpha:g}")
    base.update({k: row.get(k) for k in ("n", "mean_diff", "ci_low", "ci_high", "p_value", "min_p", "mde",
                                         "n_for_power")})
    min_p = row.get("min_p")
    reachable = _missing(min_p) or min_p < level
    base["reachable"] = reachable
    return base | _judge(base, level)


def _judge(check: Mapping[str, Any], level: float) -> dict:
    """Whether one check passes at ``level``, using the adjusted p when a correction applied."""
    why = []
    p = check["p_adjusted"] if check.get("p_adjusted") is not None else check.get("p_value")
    if not check.get("reachable", True):
        why.append(f"n={check['n']} cannot reach p < {level:g} (smallest possible p {_fmt(check['min_p'])})")
    elif _missing(p) or p >= level:
        label = "adjusted p" if check.get("p_adjusted") is not None else "one-sided p"
        why.append(f"{label}={_fmt(p)} >= {level:g}")
    lo, hi = check.get("ci_low"), check.get("ci_high")
    if _missing(lo) or lo <= 0:
        why.append(f"95% CI [{_fmt(lo)}, {_fmt(hi)}] does not lie above 0")
    if _missing(check.get("mean_diff")) or check["mean_diff"] <= 0:
        why.append(f"mean difference {_fmt(check.get('mean_diff'))} <= 0")
    return dict(passed=not why, reason="; ".join(why) if why else "passed")


def _lookup(table: pl.DataFrame | None, method: str, scaling: str, alpha: float, control: str) -> dict | None:
    if table is None or table.is_empty():
        return None
    hit = table.filter((pl.col("method") == method) & (pl.col("scaling") == scaling)
                       & ((pl.col("alpha") - alpha).abs() < 1e-9) & (pl.col("control") == control))
    return hit.row(0, named=True) if hit.height else None


def verdict(
    paired_score: pl.DataFrame,
    paired_completions: pl.DataFrame | None,
    *,
    decision_alphas: Sequence[float],
    controls: Sequence[str] = CONTROLS,
    level: float = 0.05,
    methods: Sequence[tuple[str, str]] | None = None,
    not_applicable: Mapping[str, Sequence[str]] | None = None,
    correction: str = "none",
) -> list[dict[str, Any]]:
    """Apply the decision rule to the paired tables of :func:`steercmp.stats.paired` (logmass
    score) and :func:`steercmp.stats.paired_hits` (edited-family completion hits).

    For each (method, scaling), from ``methods`` or from ``paired_score``, each metric's checks
    cover every alpha in ``decision_alphas`` and every control in ``controls`` except the ones
    ``not_applicable`` names for that method (listed under ``controls_not_applicable``, never
    counted as wins). A missing control or metric at a decision alpha counts as a loss. The
    alphas are taken as given; this function never searches for a favourable alpha.

    ``correction``: ``none`` (each method's verdict is its own claim) or ``holm`` (the claim
    "this method wins" is corrected over the family of (method, scaling) pairs: each pair's
    intersection-union p, the largest one-sided p over its checks, is Holm-adjusted).

    Returns JSON-ready dicts: method, scaling, verdict, decision_alphas, controls,
    controls_not_applicable, level, correction, logmass_wins, completions_wins, power (per
    metric: n, min_p, reachable, prompts_needed, mde, n_for_power), explanation, failures
    (the checks that failed) and checks (all).
    """
    if not decision_alphas:
        raise ValueError("decision_alphas must name at least one pre-declared alpha")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), not {level!r}")
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {CORRECTIONS}, not {correction!r}")
    alphas = [float(a) for a in decision_alphas]
    if methods is None:
        methods = sorted({(r["method"], r["scaling"]) for r in paired_score.select("method", "scaling").to_dicts()})
    tables = {"logmass": paired_score, "completions": paired_completions}
    blocks = []
    for method, scaling in methods:
        skipped = sorted(set((not_applicable or {}).get(method, ())) & set(controls))
        checks = [_check(_lookup(tables[m], method, scaling, a, c), level=level, metric=m, alpha=a, control=c)
                  for m in METRICS for a in alphas for c in controls if c not in skipped]
        blocks.append((method, scaling, skipped, checks))
    if correction == "holm":
        _holm_over_methods(blocks, level)
    return [_verdict(method, scaling, skipped, checks, alphas, controls, level, correction)
            for method, scaling, skipped, checks in blocks]


def _holm_over_methods(blocks: list, level: float) -> None:
    """Holm over the (method, scaling) family, per metric: each pair's IUT p is the largest
    one-sided p of its checks; every check of the pair is then judged with the adjusted p."""
    for metric in METRICS:
        iut = []
        for _m, _s, _skip, checks in blocks:
            ps = [c["p_value"] for c in checks if c["metric"] == metric]
            iut.append(None if not ps or any(_missing(p) for p in ps) else max(ps))
        adjusted = holm(iut)
        for (_m, _s, _skip, checks), adj in zip(blocks, adjusted, strict=True):
            for c in checks:
                if c["metric"] == metric and c["n"]:
                    c["p_adjusted"] = adj
                    c.update(_judge(c, level))


def _power_summary(checks: Sequence[Mapping[str, Any]], level: float) -> dict[str, Any]:
    ns = [c["n"] for c in checks]
    needed = [c["n_for_power"] for c in checks]
    mdes = [c["mde"] for c in checks if not _missing(c["mde"])]
    return {"n": min(ns) if ns else 0,
            "min_p": max((c["min_p"] for c in checks), default=1.0),
            "reachable": bool(checks) and all(c["reachable"] for c in checks),
            "prompts_needed": prompts_to_reach(level),
            "mde": max(mdes) if len(mdes) == len(checks) and mdes else None,
            "n_for_power": (max(needed) if needed and all(n is not None for n in needed) else None)}


def _verdict(method: str, scaling: str, skipped: list[str], checks: list[dict], alphas: list[float],
             controls: Sequence[str], level: float, correction: str) -> dict[str, Any]:
    by_metric = {m: [c for c in checks if c["metric"] == m] for m in METRICS}
    wins = {m: bool(cs) and all(c["passed"] for c in cs) for m, cs in by_metric.items()}
    power = {m: _power_summary(cs, level) for m, cs in by_metric.items()}
    alist = ", ".join(f"{a:g}" for a in alphas)
    live = [c for c in controls if c not in skipped]
    logmass = by_metric["logmass"]
    underpowered = bool(logmass) and (all(c["n"] == 0 for c in logmass)
                                      or any(c["n"] > 0 and not c["reachable"] for c in logmass))
    if underpowered:
        v = UNDERPOWERED
        n = power["logmass"]["n"]
        expl = (f"at alpha {alist}: with {n} usable prompts no logmass outcome can reach p < {level:g} "
                f"(smallest possible p {_fmt(power['logmass']['min_p'])}); at least "
                f"{power['logmass']['prompts_needed']} usable prompts are needed")
    elif wins["logmass"] and wins["completions"]:
        v = SUPPORTED
        expl = f"target beats every control on logmass and completions at alpha {alist}"
    elif wins["logmass"]:
        v = SHIFT_ONLY
        comp = by_metric["completions"]
        if not comp or all(c["n"] == 0 for c in comp):
            why = "no edited-family completion data"
        elif not power["completions"]["reachable"]:
            why = (f"completions underpowered: {power['completions']['n']} prompts cannot reach "
                   f"p < {level:g}")
        else:
            failed = sorted({c["control"] for c in comp if not c["passed"]}, key=list(controls).index)
            why = f"completions fail vs {', '.join(failed)}"
        expl = f"at alpha {alist}: logmass beats every control; {why}"
    else:
        v = NOT_SUPPORTED
        failed = sorted({c["control"] for c in by_metric["logmass"] if not c["passed"]},
                        key=list(controls).index)
        expl = f"at alpha {alist}: logmass fails vs {', '.join(failed)}"
    return dict(method=method, scaling=scaling, verdict=v, decision_alphas=alphas, controls=live,
                controls_not_applicable=skipped, level=level, correction=correction,
                logmass_wins=wins["logmass"], completions_wins=wins["completions"], power=power,
                explanation=expl, failures=[c for c in checks if not c["passed"]], checks=checks)
