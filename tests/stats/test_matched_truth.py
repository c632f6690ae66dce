"""The matched-dose verdict on synthetic data with known truth (issue: verdicts a steering
researcher would sign). Each case builds ``matched.parquet``-shaped rows directly."""

import numpy as np
import polars as pl
import pytest

from steercmp.schemas import MATCHED_SCHEMA
from steercmp.stats import matched as mv

BUDGET = 0.25


def _row(pid, method, condition, *, score, edited=None, draw=0, status="matched", kl=BUDGET):
    edited = -3.0 + score / 2 if edited is None else edited
    original = edited - score
    return {"prompt_id": pid, "method": method, "condition": condition, "draw": draw, "status": status,
            "budget": BUDGET, "budget_source": "max_kl", "multiplier": 1.0, "ratio": 0.1, "delta_norm": 1.0,
            "kl_offtarget": kl if condition != "noop" else 0.0, "kl_unsteered": kl, "logmass_edited": edited,
            "logmass_original": original, "logmass_unrelated": -9.0, "score": score, "evals": 9,
            "oracle_assisted": False}


def synthetic(n, *, effect, sd=1.0, d_edited=None, random_sd=0.85, random_mean=0.0, draws=16, seed=0,
              method="m", target_status="matched", target_kl=BUDGET, lose_prompts=None, sparse_control=None):
    """n prompts: noop score ~ N(-2, 1); target = noop + effect + N(0, sd); ``random_delta`` K
    KL-matched draws ~ noop + N(random_mean, random_sd); ``wrong_position`` ~ noop + N(0, 0.3).
    ``d_edited`` fixes the change in log P(edited) (else half the score change)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        pid = f"p{i:03d}"
        base = -2.0 + rng.standard_normal()
        e0 = -3.0
        rows.append(_row(pid, method, "noop", score=base, edited=e0, status="ok"))
        t = base + effect + sd * rng.standard_normal()
        te = e0 + (d_edited if d_edited is not None else (t - base) / 2)
        rows.append(_row(pid, method, "target_edit", score=t, edited=te, status=target_status, kl=target_kl))
        for k in range(draws):
            rows.append(_row(pid, method, "random_delta", score=base + random_mean + random_sd * rng.standard_normal(),
                             draw=k))
        if sparse_control is None or i < sparse_control:
            rows.append(_row(pid, method, "wrong_position", score=base + 0.3 * rng.standard_normal()))
    return pl.DataFrame(rows, schema=MATCHED_SCHEMA)


def completions(n, method="m", *, target_hits=0.8, control_hits=0.0, seeds=5):
    rows = []
    for i in range(n):
        for cond in ("noop", "target_edit", "random_delta", "wrong_position"):
            rate = target_hits if cond == "target_edit" else control_hits
            for s in range(seeds):
                rows.append({"prompt_id": f"p{i:03d}", "method": method, "condition": cond, "seed": s,
                             "hit_edited": s < round(rate * seeds)})
    return pl.DataFrame(rows)


def verdict(matched, comp=None, **kw):
    out = mv.matched_verdicts(matched, comp, n_boot=2_000, **kw)
    assert len(out) == 1
    return out[0]


def test_patch_like_effect_is_supported_where_one_wide_random_draw_would_defeat_it():
    """+2 nats at n=40 against the mean of 16 KL-matched draws: supported. The same effect
    against ONE norm-matched draw per prompt with SD 16 (today's control) cannot pass."""
    v = verdict(synthetic(40, effect=2.0), completions(40))
    assert v["verdict"] == mv.SUPPORTED, v["explanation"]
    assert all(c["outcome"] == mv.PASS for c in v["checks"].values())
    wide = synthetic(40, effect=2.0, random_sd=16.0, draws=1, seed=3)
    assert verdict(wide, completions(40))["checks"]["random_delta"]["outcome"] != mv.PASS


def test_wrecking_method_is_destructive_not_supported():
    v = verdict(synthetic(40, effect=50.0, sd=5.0, target_status="not_dose_matched", target_kl=200.0),
                completions(40))
    assert v["verdict"] == mv.DESTRUCTIVE
    assert v["kl_over_budget"] > 100


def test_score_that_rises_only_because_the_original_falls_suppresses_the_original():
    """log P(original) falls by 10 while log P(edited) falls by 2: the score rises by 8."""
    v = verdict(synthetic(40, effect=8.0, sd=0.5, d_edited=-2.0), completions(40))
    assert v["verdict"] == mv.SUPPRESSES
    assert v["itt"]["d_edited"]["ci_high"] < 0


def test_true_null_with_small_spread_reads_no_effect():
    v = verdict(synthetic(40, effect=0.0, sd=0.3, random_sd=0.3), completions(40, target_hits=0.0))
    assert v["verdict"] == mv.NO_EFFECT
    assert v["checks"]["noop"]["ci_high"] < 0.5
    v = verdict(synthetic(40, effect=0.0, sd=1.0, random_sd=1.0), completions(40, target_hits=0.0))
    assert v["verdict"] == mv.NO_EFFECT


def test_the_same_null_at_six_prompts_is_inconclusive():
    v = verdict(synthetic(6, effect=0.0, sd=1.0, random_sd=1.0), completions(6, target_hits=0.0))
    assert v["verdict"] == mv.INCONCLUSIVE
    assert v["power"]["prompts_needed"] is None or v["power"]["prompts_needed"] > 6
    # over many batteries: 40 prompts settle the null far more often than 6 do
    rates = {n: np.mean([verdict(synthetic(n, effect=0.0, sd=1.0, random_sd=1.0, seed=s))["verdict"] == mv.NO_EFFECT
                         for s in range(12)]) for n in (6, 40)}
    assert rates[40] >= 0.75 and rates[6] <= 0.5, rates


def test_all_zero_completions_cannot_tell():
    v = verdict(synthetic(40, effect=2.0), completions(40, target_hits=0.0))
    assert v["verdict"] == mv.SHIFT_ONLY
    assert {c["outcome"] for c in v["completions"].values()} == {"cannot tell"}


@pytest.mark.parametrize("sparse", [3, None])
def test_a_method_that_loses_to_noop_is_never_inconclusive(sparse):
    """-0.94 vs noop with a tight spread, whatever another control's n (3 prompts here)."""
    v = verdict(synthetic(40, effect=-0.94, sd=0.2, sparse_control=sparse), completions(40, target_hits=0.0))
    assert v["verdict"] in (mv.NO_EFFECT, mv.NOT_SUPPORTED)


def test_intention_to_treat_counts_dropped_prompts_as_noop():
    m = synthetic(20, effect=2.0, sd=0.5)
    dropped = [f"p{i:03d}" for i in range(10)]
    m = m.with_columns(pl.when(pl.col("prompt_id").is_in(dropped) & (pl.col("condition") == "target_edit"))
                       .then(pl.lit("dropped")).otherwise(pl.col("status")).alias("status"))
    v = verdict(m)
    assert v["n_itt"] == 20 and v["n_selected"] == 10
    assert v["itt"]["score_vs_noop"]["mean"] == pytest.approx(v["selected"]["score_vs_noop"]["mean"] / 2, rel=1e-9)


def test_whole_rule_power_needs_every_control_and_the_ci():
    """Power falls as controls are added (every check must pass), and is near the level at 0."""
    rng = np.random.default_rng(0)
    one = rng.standard_normal((40, 1))
    three = rng.standard_normal((40, 3))
    p1 = mv.whole_rule_power(one - one.mean(0), 0.4, level=0.05, seed=0)
    p3 = mv.whole_rule_power(three - three.mean(0), 0.4, level=0.05, seed=0)
    assert p3 < p1
    assert mv.whole_rule_power(one - one.mean(0), 0.0, level=0.05, seed=0) < 0.1
