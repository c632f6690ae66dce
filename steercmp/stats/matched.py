"""The matched-dose verdict: methods compared at the same side-effect cost, on every prompt,
with three honest outcomes per check (docs/statistics.md).

Input: ``matched.parquet`` (:mod:`steercmp.run.match`): per prompt, every method's target and
controls at the prompt's off-target-KL budget, the K draws of each shared random control, and
no-op. Per method:

- **intention-to-treat** (primary): every prompt of the battery counts; a prompt the method
  dropped, fell back on or gated, and a control with no row there, take the no-op's values (zero
  effect). The ``selected`` analysis (prompts the method scored) is reported beside it.
- **checks**: the score of the target minus each control's, per prompt (a shared control: the
  mean of its K draws). Each check ends in one of three outcomes against the pre-declared
  smallest effect of interest ``min_effect``: ``pass`` (one-sided sign-flip p < level and the
  95% bootstrap CI above 0), ``no effect`` (the CI's upper end below ``min_effect`` and the
  one-sided sign-flip test of ``d - min_effect < 0`` significant: the upper half of TOST,
  Lakens 2017) or ``inconclusive``.
- **verdict**: ``no effect`` (vs no-op), ``not supported`` (a control does as well), then
  ``inconclusive`` (with the prompts the whole rule needs), then for a score that beats every
  control: ``destructive`` (a win only above the side-effect budget), ``suppresses the original
  only`` (the edited family itself falls: the CI of the change in log P(edited) reaches below
  ``-min_effect``), ``causal claim supported`` (completions also win) or ``probability shift only``.
- **power** of the WHOLE rule (every score check, the CI condition) simulated at ``min_effect``
  from the centred per-prompt differences, not at the observed effect.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import numpy as np
import polars as pl

from steercmp.stats._core import bootstrap_mean_ci, sign_flip_pvalue
from steercmp.stats.power import POWER, _reject

SUPPORTED = "causal claim supported"
SHIFT_ONLY = "probability shift only"
SUPPRESSES = "suppresses the original only"
NO_EFFECT = "no effect"
NOT_SUPPORTED = "not supported"
INCONCLUSIVE = "inconclusive"
DESTRUCTIVE = "destructive"
VERDICTS = (SUPPORTED, SHIFT_ONLY, SUPPRESSES, DESTRUCTIVE, NOT_SUPPORTED, NO_EFFECT, INCONCLUSIVE)
PASS, NULL, OPEN, CANNOT_TELL = "pass", "no effect", "inconclusive", "cannot tell"

TARGET, NOOP = "target_edit", "noop"
#: matched statuses whose row injects the method's direction (the rest are no-op under ITT)
SCORED = ("matched", "fixed", "off_budget", "unreachable", "not_dose_matched")
#: statuses at which a method is not at the budget (a win there may be bought with side effects)
UNMATCHED = ("off_budget", "unreachable", "not_dose_matched")
#: a method is over budget when its median off-target KL exceeds the budget by this factor
OVER_BUDGET = 1.25
N_SIMS, N_SIM_BOOT = 200, 200
MC_RECHECK = 100_000


def check(diffs: np.ndarray, *, level: float, min_effect: float, n_boot: int, seed: int) -> dict[str, Any]:
    """One paired check: n, effective n (non-zero differences), mean, 95% CI, one-sided p and
    its outcome. A Monte-Carlo p within 3 standard errors of the level is recomputed with
    :data:`MC_RECHECK` draws, so the outcome does not flip with the random stream or dtype."""
    d = np.asarray(diffs, dtype=np.float64)
    n, n_eff = int(d.shape[0]), int(np.count_nonzero(d))
    if n == 0:
        return dict(n=0, n_eff=0, mean=None, ci_low=None, ci_high=None, p_value=None, p_equivalence=None,
                    min_p=1.0, outcome=OPEN)
    lo, hi = bootstrap_mean_ci(d, n_boot=n_boot, seed=seed)
    p, exact = sign_flip_pvalue(d, alternative="greater", seed=seed)
    if not exact and abs(p - level) < 3 * math.sqrt(max(p * (1 - p), 1e-12) / 10_000):
        p, exact = sign_flip_pvalue(d, alternative="greater", seed=seed, n_perm=MC_RECHECK)
    mean = float(d.mean())
    # the equivalence side of TOST: "below min_effect" must itself be significant (sign-flip on
    # d - min_effect), not only the bootstrap CI's upper end, which is narrow at small n
    p_equiv = sign_flip_pvalue(d - min_effect, alternative="less", seed=seed)[0] if math.isfinite(min_effect) else 1.0
    if n_eff == 0:
        outcome = NULL if p_equiv < level else OPEN
    elif p < level and lo > 0 and mean > 0:
        outcome = PASS
    elif hi < min_effect and p_equiv < level:
        outcome = NULL
    else:
        outcome = OPEN
    return dict(n=n, n_eff=n_eff, mean=mean, ci_low=lo, ci_high=hi, p_value=p, p_equivalence=p_equiv,
                min_p=2.0 ** -n_eff if n_eff else 1.0, outcome=outcome)


def _values(rows: pl.DataFrame) -> dict[str, dict[str, float]]:
    return {r["prompt_id"]: r for r in rows.iter_rows(named=True)}


def per_prompt(matched: pl.DataFrame, method: str, prompts: Sequence[str], *, itt: bool = True
               ) -> tuple[pl.DataFrame, list[str]]:
    """One row per prompt for ``method``: the target's score, edited and original log-masses and
    off-target KL, the budget, no-op's values, and one ``ctrl:<name>`` score column per control
    (shared controls averaged over their draws). Under ``itt`` a missing or unscored value takes
    the no-op's; otherwise prompts whose target was not scored are left out."""
    m = matched.filter(pl.col("method") == method)
    noop = _values(m.filter(pl.col("condition") == NOOP))
    scored = m.filter(pl.col("status").is_in(list(SCORED)) & pl.col("score").is_not_null())
    target = _values(scored.filter(pl.col("condition") == TARGET))
    controls = [c for c in m["condition"].unique(maintain_order=True).to_list() if c not in (TARGET, NOOP)
                and not m.filter(pl.col("condition") == c)["status"].eq("not_applicable").all()]
    ctrl_means = {c: _values(scored.filter(pl.col("condition") == c).group_by("prompt_id").agg(
        pl.col("score").mean())) for c in controls}
    out = []
    for pid in prompts:
        base = noop.get(pid)
        if base is None or base.get("score") is None:
            continue
        t = target.get(pid)
        if t is None and not itt:
            continue
        t = t or base
        row = {"prompt_id": pid, "scored": pid in target, "score": t["score"],
               "d_edited": t["logmass_edited"] - base["logmass_edited"],
               "d_original": t["logmass_original"] - base["logmass_original"],
               "kl_offtarget": t["kl_offtarget"] if pid in target else 0.0,
               "budget": base["budget"], "status": t["status"] if pid in target else "itt_noop",
               "ctrl:noop": base["score"]}
        for c in controls:
            v = ctrl_means[c].get(pid)
            row[f"ctrl:{c}"] = v["score"] if v is not None else base["score"]
        out.append(row)
    return pl.DataFrame(out, infer_schema_length=None), [NOOP, *controls]


def _differences(frame: pl.DataFrame, controls: Sequence[str]) -> np.ndarray:
    if frame.is_empty():
        return np.zeros((0, len(controls)))
    t = frame["score"].to_numpy()
    return np.stack([t - frame[f"ctrl:{c}"].to_numpy() for c in controls], axis=1)


def whole_rule_power(residuals: np.ndarray, effect: float, *, level: float, seed: int, n: int | None = None,
                     n_sims: int = N_SIMS, n_boot: int = N_SIM_BOOT) -> float:
    """Power of the whole score rule (every control's sign-flip p < level AND its bootstrap CI
    above 0) when the target beats every control by ``effect``: prompts resampled jointly
    across controls from the centred differences ``residuals [n, C]`` (their correlation kept)."""
    r = np.asarray(residuals, dtype=np.float64)
    if r.shape[0] == 0:
        return 0.0
    n = n or r.shape[0]
    rng = np.random.default_rng(seed)
    x = r[rng.integers(0, r.shape[0], (n_sims, n))] + effect  # [S, n, C]
    ok = np.ones(n_sims, dtype=bool)
    for c in range(x.shape[2]):
        xc = x[:, :, c]
        reject = _reject(xc, level, rng)
        if n <= 100:
            means = xc[:, rng.integers(0, n, (n_boot, n))].mean(axis=-1)  # [S, B]
            low = np.percentile(means, 2.5, axis=1)
        else:
            low = xc.mean(axis=1) - 1.96 * xc.std(axis=1, ddof=1) / math.sqrt(n)
        ok &= reject & (low > 0) & (xc.mean(axis=1) > 0)
    return float(ok.mean())


def power_summary(diffs: np.ndarray, *, min_effect: float, level: float, seed: int) -> dict[str, Any]:
    """Power of the whole rule at ``min_effect`` at this n, its minimum detectable effect (80%
    power) and the prompts it needs for 80% power at ``min_effect`` (``None`` past 4,096)."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.shape[0] < 2:
        return {"n": int(d.shape[0]), "power_at_min_effect": 0.0, "mde": None, "prompts_needed": None}
    resid = d - d.mean(axis=0)
    power = whole_rule_power(resid, min_effect, level=level, seed=seed)
    spread = float(np.sqrt((resid ** 2).mean())) or 1.0

    def ok(effect: float) -> bool:
        return whole_rule_power(resid, effect, level=level, seed=seed) >= POWER

    mde: float | None = None
    lo, hi = 0.0, spread
    while not ok(hi) and hi < spread * 2 ** 12:
        lo, hi = hi, hi * 2
    if ok(hi):
        for _ in range(12):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if ok(mid) else (mid, hi)
        mde = hi
    needed: int | None = d.shape[0] if power >= POWER else None
    if needed is None:
        lo_n, hi_n = d.shape[0], d.shape[0] * 2
        while whole_rule_power(resid, min_effect, level=level, seed=seed, n=hi_n) < POWER:
            lo_n, hi_n = hi_n, hi_n * 2
            if hi_n > 4096:
                break
        if hi_n <= 4096:
            while hi_n - lo_n > 1:
                mid = (lo_n + hi_n) // 2
                if whole_rule_power(resid, min_effect, level=level, seed=seed, n=mid) >= POWER:
                    hi_n = mid
                else:
                    lo_n = mid
            needed = hi_n
    return {"n": int(d.shape[0]), "power_at_min_effect": power, "mde": mde, "prompts_needed": needed}


def planned_power(n: int, n_controls: int, *, min_effect: float, sd: float, level: float = 0.05,
                  seed: int = 0) -> float:
    """Power of the whole rule at ``min_effect`` before any data: ``n`` prompts, ``n_controls``
    independent controls, normal per-prompt differences of standard deviation ``sd``."""
    resid = np.random.default_rng(seed).standard_normal((max(n, 1) * 8, max(n_controls, 1))) * sd
    return whole_rule_power(resid - resid.mean(axis=0), min_effect, level=level, seed=seed, n=n)


def _completion_checks(completions: pl.DataFrame | None, method: str, controls: Sequence[str], prompts: Sequence[str],
                       *, level: float, n_boot: int, seed: int) -> dict[str, dict[str, Any]]:
    """Target minus each control in seed-averaged edited-family hits per prompt (ITT: a prompt
    without target completions takes no-op's). All-zero hits in both arms: ``cannot tell``."""
    if completions is None or completions.is_empty():
        return {}
    c = completions.filter((pl.col("method") == method) & pl.col("hit_edited").is_not_null())
    per = c.group_by("condition", "prompt_id").agg(pl.col("hit_edited").cast(pl.Float64).mean())
    table = {(r["condition"], r["prompt_id"]): r["hit_edited"] for r in per.iter_rows(named=True)}
    out = {}
    for ctrl in controls:
        diffs, any_hit = [], False
        for pid in prompts:
            base = table.get((NOOP, pid))
            if base is None:
                continue
            t = table.get((TARGET, pid), base)
            v = table.get((ctrl, pid), base)
            any_hit = any_hit or t > 0 or v > 0
            diffs.append(t - v)
        res = check(np.asarray(diffs), level=level, min_effect=float("inf"), n_boot=n_boot, seed=seed)
        if not any_hit:
            res["outcome"] = CANNOT_TELL
        elif res["outcome"] == NULL:
            res["outcome"] = OPEN  # completions have no smallest effect of interest: never "no effect"
        out[ctrl] = res
    return out


def matched_verdicts(matched: pl.DataFrame, completions: pl.DataFrame | None, *, level: float = 0.05,
                     min_effect: float = 0.5, n_boot: int = 10_000, seed: int = 0,
                     methods: Sequence[str] | None = None, roles: Mapping[str, str] | None = None
                     ) -> list[dict[str, Any]]:
    """One JSON-ready verdict per method (see the module docstring), positive control first."""
    roles = roles or {}
    prompts = matched["prompt_id"].unique(maintain_order=True).to_list()
    methods = list(methods) if methods is not None else [
        m for m in matched["method"].unique(maintain_order=True).to_list() if roles.get(m) != "ceiling"]
    rule = DecisionRule(level=level, min_effect=min_effect, n_boot=n_boot, seed=seed)
    return [_verdict(matched, completions, m, prompts, rule=rule, role=roles.get(m)) for m in methods]


@attrs.frozen
class DecisionRule:
    """The settings every check of one verdict shares: the test ``level``, the smallest effect of
    interest, and the bootstrap's resamples and seed."""

    level: float
    min_effect: float
    n_boot: int
    seed: int


def _summaries(frame: pl.DataFrame, *, n_boot: int, seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for col in ("score_vs_noop", "d_edited", "d_original"):
        x = frame[col].to_numpy() if not frame.is_empty() else np.zeros(0)
        lo, hi = bootstrap_mean_ci(x, n_boot=n_boot, seed=seed) if x.size else (None, None)
        out[col] = {"mean": float(x.mean()) if x.size else None, "ci_low": lo, "ci_high": hi,
                    "n_positive": int((x > 0).sum()), "n_negative": int((x < 0).sum())}
    return out


def _verdict(matched: pl.DataFrame, completions: pl.DataFrame | None, method: str, prompts: Sequence[str], *,
             rule: DecisionRule, role: str | None) -> dict[str, Any]:
    level, min_effect, n_boot, seed = rule.level, rule.min_effect, rule.n_boot, rule.seed
    frame, controls = per_prompt(matched, method, prompts, itt=True)
    selected, _ = per_prompt(matched, method, prompts, itt=False)
    if frame.is_empty():
        return {"method": method, "role": role, "verdict": INCONCLUSIVE, "n_itt": 0, "n_selected": 0,
                "explanation": "no prompt has a no-op row", "checks": {}, "completions": {}}
    frame = frame.with_columns((pl.col("score") - pl.col("ctrl:noop")).alias("score_vs_noop"))
    selected = selected.with_columns((pl.col("score") - pl.col("ctrl:noop")).alias("score_vs_noop")) \
        if not selected.is_empty() else selected
    diffs = _differences(frame, controls)
    checks = {c: check(diffs[:, j], level=level, min_effect=min_effect, n_boot=n_boot, seed=seed)
              for j, c in enumerate(controls)}
    power = power_summary(diffs, min_effect=min_effect, level=level, seed=seed)
    summary = _summaries(frame, n_boot=n_boot, seed=seed)
    scored = frame.filter(pl.col("scored"))
    kl = scored["kl_offtarget"].drop_nulls().to_numpy() if not scored.is_empty() else np.zeros(0)
    budget = scored["budget"].drop_nulls().to_numpy() if not scored.is_empty() else np.zeros(0)
    ratio = float(np.median(kl / np.where(budget > 0, budget, np.nan))) if kl.size and budget.size else None
    statuses = scored["status"].to_list() if not scored.is_empty() else []
    dose_matched = bool(statuses) and all(s in ("matched", "fixed") for s in statuses)
    over_budget = ratio is not None and ratio > OVER_BUDGET
    comp = _completion_checks(completions, method, controls, prompts, level=level, n_boot=n_boot, seed=seed)
    verdict, decided_by, expl = _decide(checks, comp, summary, min_effect=min_effect, over_budget=over_budget,
                                        power=power)
    n_sel = int(frame["scored"].sum())
    if n_sel < frame.height:
        expl += f" (the method scored {n_sel} of {frame.height} prompts; the others count as no-op)"
    return {
        "method": method, "role": role, "verdict": verdict, "decided_by": decided_by, "explanation": expl,
        "n_itt": frame.height, "n_selected": n_sel,
        "dose_matched": dose_matched, "statuses": {s: statuses.count(s) for s in sorted(set(statuses))},
        "kl_offtarget_median": float(np.median(kl)) if kl.size else None,
        "budget_median": float(np.median(budget)) if budget.size else None, "kl_over_budget": ratio,
        "multiplier_median": _median(matched, method, "multiplier"),
        "ratio_median": _median(matched, method, "ratio"),
        "oracle_assisted": bool(matched.filter((pl.col("method") == method) & (pl.col("condition") == TARGET))
                                ["oracle_assisted"].fill_null(False).any()),
        "itt": summary, "selected": _summaries(selected, n_boot=n_boot, seed=seed) if not selected.is_empty() else None,
        "controls": list(controls), "checks": checks, "completions": comp, "power": power, "min_effect": min_effect,
        "random_spread": random_spread(matched, method),
        "level": level,
    }


def random_spread(matched: pl.DataFrame, method: str) -> dict[str, dict[str, float | int | None]]:
    """Per shared random control (a condition with several draws): its mean effect on the score
    vs no-op, the spread of that effect between prompts, and the spread between draws within a
    prompt (what averaging K draws removes)."""
    m = matched.filter((pl.col("method") == method) & pl.col("status").is_in(list(SCORED))
                       & pl.col("score").is_not_null())
    noop = matched.filter((pl.col("method") == method) & (pl.col("condition") == NOOP)).select(
        "prompt_id", pl.col("score").alias("_noop"))
    out: dict[str, dict[str, float | int | None]] = {}
    for cond in m.filter(pl.col("draw") > 0)["condition"].unique(maintain_order=True).to_list():
        per = (m.filter(pl.col("condition") == cond).join(noop, on="prompt_id")
               .group_by("prompt_id", maintain_order=True).agg((pl.col("score") - pl.col("_noop")).mean().alias("mean"),
                                          (pl.col("score")).std().alias("sd"), pl.len().alias("k")))
        out[cond] = {"mean_effect": per["mean"].mean(), "between_prompt_sd": per["mean"].std(),  # type: ignore[dict-item]
                     "within_prompt_sd": per["sd"].mean(), "draws": int(per["k"].max() or 0)}  # type: ignore[dict-item]
    return out


def _median(matched: pl.DataFrame, method: str, col: str) -> float | None:
    x = matched.filter((pl.col("method") == method) & (pl.col("condition") == TARGET)
                       & pl.col("status").is_in(list(SCORED)))[col].drop_nulls()
    return float(x.median()) if x.len() else None  # type: ignore[arg-type]


def _decide(checks: Mapping[str, dict], comp: Mapping[str, dict], summary: Mapping[str, Any], *,
            min_effect: float, over_budget: bool, power: Mapping[str, Any]) -> tuple[str, str, str]:
    """``(verdict, the check that decided it, one sentence)``; losses are decided before power."""
    noop = checks[NOOP]
    if noop["outcome"] == NULL:
        return NO_EFFECT, "vs noop", (f"score vs noop {_ci(noop)}: the CI lies below the smallest effect of "
                                      f"interest {min_effect:g}")
    null = [c for c, r in checks.items() if r["outcome"] == NULL]
    if null:
        return NOT_SUPPORTED, f"vs {null[0]}", (f"does no better than {', '.join(null)}: {_ci(checks[null[0]])} "
                                               f"lies below {min_effect:g}")
    open_ = [c for c, r in checks.items() if r["outcome"] == OPEN]
    if open_:
        need = power.get("prompts_needed")
        return INCONCLUSIVE, f"vs {open_[0]}", (
            f"vs {', '.join(open_)} neither passes nor is excluded ({_ci(checks[open_[0]])}); the whole rule has "
            f"{power.get('power_at_min_effect', 0):.0%} power at {min_effect:g} with {power.get('n')} prompts"
            + (f", about {need} prompts would give 80%" if need else ", more than 4,096 prompts would be needed"))
    if over_budget:
        return DESTRUCTIVE, "side effect", "beats every control, but only above the side-effect budget"
    edited = summary["d_edited"]
    if edited["ci_low"] is not None and edited["ci_low"] <= -min_effect:
        return SUPPRESSES, "log P(edited)", (
            f"beats every control, but log P(edited) changes by {edited['mean']:+.3g} "
            f"[{edited['ci_low']:+.3g}, {edited['ci_high']:+.3g}]: the score rises because the original falls")
    if not comp:
        return SHIFT_ONLY, "completions", "beats every control on the score; no completions at the matched dose"
    failing = [c for c, r in comp.items() if r["outcome"] != PASS]
    if not failing:
        return SUPPORTED, "completions", "beats every control on the score and on edited-family completions"
    why = comp[failing[0]]["outcome"]
    return SHIFT_ONLY, f"completions vs {failing[0]}", (
        f"beats every control on the score; completions vs {', '.join(failing)}: {why}")


def _ci(r: Mapping[str, Any]) -> str:
    if r.get("mean") is None:
        return "no data"
    return f"{r['mean']:+.3g} [{r['ci_low']:+.3g}, {r['ci_high']:+.3g}]"


def expected_hits(matched: pl.DataFrame, method: str, seeds: int) -> float | None:
    """Edited-family hits to expect from the target's next-token mass alone (a floor: a hit may
    also come later in the line), summed over prompts: why all-zero completions say little."""
    t = matched.filter((pl.col("method") == method) & (pl.col("condition") == TARGET)
                       & pl.col("logmass_edited").is_not_null())
    if t.is_empty():
        return None
    return float(np.exp(t["logmass_edited"].to_numpy()).sum() * seeds)


__all__ = ["DESTRUCTIVE", "INCONCLUSIVE", "NOT_SUPPORTED", "NO_EFFECT", "SHIFT_ONLY", "SUPPORTED", "SUPPRESSES",
           "VERDICTS", "check", "expected_hits", "matched_verdicts", "per_prompt", "planned_power",
           "power_summary", "whole_rule_power"]
