"""Statistics tests: SciPy references on synthetic data, and the research note's table."""

from __future__ import annotations

import inspect
import itertools

import numpy as np
import polars as pl
import pytest
from scipy import stats as sps

from steercmp import stats

N_BOOT = 2000
NOTE_TARGET_ALPHA4 = {
    "bird_word": 37.612, "fire_desire": -4.064, "hill_still": -1.067, "night_light": 0.149,
    "rain_pane": 19.949, "shore_more": 10.212, "snow_glow": -0.061, "stream_dream": -6.328,
}


def cells_from(values: dict[tuple[str, str, float], list[float | None]], *, method: str = "m",
               scaling: str = "raw", statuses: list[str] | None = None) -> pl.DataFrame:
    """cells rows from {(condition, prompt-prefix, alpha): scores}; prompts are p0..pN."""
    rows = []
    for (cond, _, alpha), vals in values.items():
        for i, v in enumerate(vals):
            rows.append(dict(prompt_id=f"p{i:02d}", method=method, condition=cond, alpha=alpha,
                             scaling=scaling, delta_norm=1.0, score=v,
                             status=(statuses[i] if statuses else "ok") if v is not None
                             else "dropped", meta="{}"))
    return pl.DataFrame(rows, schema_overrides={"score": pl.Float64})


def _mean(x, axis=-1):  # type: ignore[no-untyped-def]
    return np.mean(x, axis=axis)


# ------------------------------------------------------------------ the research note

def test_note_table_target_edit_alpha4():
    cells = pl.DataFrame({
        "prompt_id": list(NOTE_TARGET_ALPHA4), "method": "nla_text_edit",
        "condition": "target_edit", "alpha": 4.0, "scaling": "raw",
        "score": list(NOTE_TARGET_ALPHA4.values()), "status": "editable",
    })
    row = stats.summarize(cells, n_boot=N_BOOT).row(0, named=True)
    assert (round(row["mean"], 3), round(row["median"], 3)) == (7.050, 0.044)
    assert (row["n_positive"], row["n"], row["n_excluded"]) == (4, 8, 0)
    assert row["ci_low"] < row["mean"] < row["ci_high"]
    text = stats.format_summary_table(stats.summarize(cells, n_boot=N_BOOT))
    assert "+7.050" in text and "+0.044" in text and "4/8" in text


# ------------------------------------------------------------------ bootstrap vs scipy

@pytest.mark.parametrize("n,seed", [(8, 0), (13, 5), (30, 123)])
def test_bootstrap_matches_scipy_percentile(n, seed):
    x = np.random.default_rng(seed + 100).normal(1.0, 3.0, n)
    ours = stats.bootstrap_mean_ci(x, n_boot=N_BOOT, seed=seed)
    ref = sps.bootstrap((x,), _mean, n_resamples=N_BOOT, method="percentile",
                        confidence_level=0.95, rng=np.random.default_rng(seed))
    assert ours == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high),
                                 rel=1e-12, abs=1e-12)


def test_summarize_ci_is_scipy_bootstrap_and_default_is_10000():
    x = np.random.default_rng(1).normal(0.5, 2.0, 8)
    cells = cells_from({("target_edit", "p", 2.0): x.tolist()})
    row = stats.summarize(cells, n_boot=N_BOOT, seed=3).row(0, named=True)
    ref = sps.bootstrap((x,), _mean, n_resamples=N_BOOT, method="percentile",
                        rng=np.random.default_rng(3)).confidence_interval
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((ref.low, ref.high), rel=1e-12)
    for fn in (stats.summarize, stats.hit_rates):
        assert inspect.signature(fn).parameters["n_boot"].default == 10_000
    for fn in (stats.paired, stats.paired_hits, stats.relative_to_noop):
        assert inspect.signature(fn).parameters["test"].default == stats.PairedTest()
    assert stats.PairedTest().n_boot == 10_000
    # the default actually runs at 10,000 resamples and is seeded (same call, same CI)
    a = stats.summarize(cells)
    assert a.equals(stats.summarize(cells))


def test_summarize_excludes_null_and_dropped():
    cells = cells_from({("target_edit", "p", 2.0): [1.0, -2.0, None, 3.0, float("nan")]})
    row = stats.summarize(cells, n_boot=200).row(0, named=True)
    assert (row["n"], row["n_excluded"], row["n_positive"]) == (3, 2, 2)
    assert row["mean"] == pytest.approx(2.0 / 3.0)
    assert row["median"] == pytest.approx(1.0)


# ------------------------------------------------------------------ sign-flip vs scipy

@pytest.mark.parametrize("n", [2, 5, 8, 12])
@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_sign_flip_exact_matches_scipy(n, alternative):
    d = np.random.default_rng(n).normal(0.4, 1.0, n)
    p, exact = stats.sign_flip_pvalue(d, alternative=alternative)
    ref = sps.permutation_test((d,), _mean, permutation_type="samples", vectorized=True,
                               n_resamples=np.inf, alternative=alternative)
    assert exact
    assert p == pytest.approx(ref.pvalue, rel=1e-12)


def test_sign_flip_exact_with_ties_and_zeros():
    d = np.array([1.0, 1.0, -1.0, 0.0, 2.0, 2.0, 1.0, 0.5])
    p, _ = stats.sign_flip_pvalue(d)
    ref = sps.permutation_test((d,), _mean, permutation_type="samples", vectorized=True,
                               n_resamples=np.inf).pvalue
    assert p == pytest.approx(ref, rel=1e-12)


def test_sign_flip_exact_up_to_20_then_monte_carlo():
    d20 = np.random.default_rng(0).normal(0.3, 1.0, 20)
    assert stats.sign_flip_pvalue(d20)[1] is True
    d25 = np.random.default_rng(1).normal(0.5, 1.0, 25)
    p, exact = stats.sign_flip_pvalue(d25, n_perm=4000, seed=0)
    assert exact is False
    assert p == stats.sign_flip_pvalue(d25, n_perm=4000, seed=0)[0]  # seeded
    ref = sps.permutation_test((d25,), _mean, permutation_type="samples", vectorized=True,
                               n_resamples=20000, rng=np.random.default_rng(9)).pvalue
    assert p == pytest.approx(ref, abs=0.02)
    assert p >= 1 / 4001


# ------------------------------------------------------------------ Holm

def _holm_reference(p: list[float]) -> list[float]:
    """Textbook Holm: reject sequentially; adjusted p_(i) = max_{j<=i} min(1, (m-j+1) p_(j))."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    adj = [0.0] * m
    prev = 0.0
    for j, i in enumerate(order, start=1):
        prev = max(prev, min(1.0, (m - j + 1) * p[i]))
        adj[i] = prev
    return adj


def test_holm_known_values_and_reference():
    assert stats.holm([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert stats.holm([0.02, None, 0.01]) == [pytest.approx(0.02), None, pytest.approx(0.02)]
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = rng.uniform(0, 0.2, rng.integers(1, 7)).tolist()
        assert stats.holm(p) == pytest.approx(_holm_reference(p))


# ------------------------------------------------------------------ paired

def _paired_cells(n: int = 8, seed: int = 0) -> tuple[pl.DataFrame, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    target = rng.normal(3.0, 1.0, n)
    controls = {c: rng.normal(0.0, 1.0, n) for c in stats.CONTROLS}
    values = {("target_edit", "p", 2.0): target.tolist()}
    values |= {(c, "p", 2.0): v.tolist() for c, v in controls.items()}
    return cells_from(values), {c: target - v for c, v in controls.items()}


def test_paired_matches_components():
    cells, diffs = _paired_cells()
    out = stats.paired(cells, test=stats.PairedTest(n_boot=N_BOOT, seed=4))
    assert out.columns[:12] == ["method", "scaling", "alpha", "control", "n", "mean_diff",
                                "ci_low", "ci_high", "p_value", "exact", "min_p", "mde"]
    assert out.height == 4
    for ctrl in stats.CONTROLS:
        row = out.filter(pl.col("control") == ctrl).row(0, named=True)
        d = diffs[ctrl]
        assert row["n"] == 8 and row["mean_diff"] == pytest.approx(d.mean())
        ref_ci = sps.bootstrap((d,), _mean, n_resamples=N_BOOT, method="percentile",
                               rng=np.random.default_rng(4)).confidence_interval
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((ref_ci.low, ref_ci.high))
        ref_p = sps.permutation_test((d,), _mean, permutation_type="samples", vectorized=True,
                                     n_resamples=np.inf, alternative="greater").pvalue
        assert row["p_value"] == pytest.approx(ref_p)  # one-sided: target > control
        assert row["min_p"] == pytest.approx(2.0 ** -8) and row["exact"]


def test_paired_uses_prompts_present_in_both():
    cells = cells_from({("target_edit", "p", 1.0): [1.0, 2.0, 3.0, None],
                        ("noop", "p", 1.0): [0.0, None, 1.0, 5.0]})
    row = stats.paired(cells, controls=("noop",), test=stats.PairedTest(n_boot=200)).row(0, named=True)
    assert row["n"] == 2 and row["mean_diff"] == pytest.approx(1.5)
    missing = stats.paired(cells, controls=("noop", "random_delta"), test=stats.PairedTest(n_boot=200))
    rd = missing.filter(pl.col("control") == "random_delta").row(0, named=True)
    assert rd["n"] == 0 and rd["p_value"] is None and rd["min_p"] == 1.0


def _completions(rates: dict[str, list[list[int]]], alpha: float = 2.0) -> pl.DataFrame:
    """{condition: per-prompt lists of per-seed edited hits} -> completions rows."""
    rows = []
    for cond, prompts in rates.items():
        for i, seeds in enumerate(prompts):
            for s, h in enumerate(seeds):
                rows.append(dict(prompt_id=f"p{i:02d}", method="m", condition=cond, alpha=alpha,
                                 scaling="raw", seed=s, text="", line="", hit_original=False,
                                 hit_edited=bool(h), hit_unrelated=False, status="ok"))
    return pl.DataFrame(rows)


def test_hit_rates_average_seeds_within_prompt_first():
    comp = _completions({"noop": [[1, 1, 1, 1], [0]]})
    row = stats.hit_rates(comp, n_boot=200).filter(pl.col("family") == "edited").row(0, named=True)
    assert row["rate"] == pytest.approx(0.5)  # not 4/5
    assert (row["n_prompts"], row["n_completions"]) == (2, 5)
    assert 0.0 <= row["ci_low"] <= row["rate"] <= row["ci_high"] <= 1.0


def test_paired_hits():
    comp = _completions({"target_edit": [[1, 1], [1, 0], [1, 1]],
                         "noop": [[0, 0], [0, 0], [1, 1]]})
    row = stats.paired_hits(comp, controls=("noop",), test=stats.PairedTest(n_boot=200)).row(0, named=True)
    assert row["n"] == 3 and row["mean_diff"] == pytest.approx((1 + 0.5 + 0) / 3)


def test_relative_to_noop_dose_response_and_peaks():
    vals = {}
    for a, eff in [(0.0, 0.0), (2.0, 2.0), (4.0, 5.0), (8.0, 3.0)]:
        vals[("target_edit", "p", a)] = [eff + i * 0.1 for i in range(6)]
        vals[("noop", "p", a)] = [i * 0.1 for i in range(6)]
    cells = cells_from(vals)
    rel = stats.relative_to_noop(cells, test=stats.PairedTest(n_boot=200))
    assert set(rel["condition"].unique()) == {"target_edit"}
    assert rel.filter(pl.col("alpha") == 4.0)["mean_diff"][0] == pytest.approx(5.0)
    s = stats.summarize(cells, n_boot=200)
    pk = stats.peaks(s).filter(pl.col("condition") == "target_edit").row(0, named=True)
    assert pk["peak_alpha"] == 4.0
    dr = stats.dose_response(s)
    assert dr.filter(pl.col("is_peak") & (pl.col("condition") == "target_edit"))["alpha"].to_list() == [4.0]


def test_heterogeneity_selection_status():
    cells = cells_from({("target_edit", "p", 2.0): [1.0, 2.0, None],
                        ("noop", "p", 2.0): [0.0, 0.5, 0.1]},
                       statuses=["editable", "fallback", "dropped"])
    t = stats.heterogeneity_table(cells, method="m", scaling="raw", alpha=2.0)
    assert t["selection"].to_list() == ["editable", "fallback", "dropped"]
    assert t["target_edit"].to_list()[:2] == [1.0, 2.0] and t["target_edit"][2] is None


# ------------------------------------------------------------------ decision rule

def _verdict_inputs(target_effect: float, hit_effect: float, *, weak: str | None = None):
    rng = np.random.default_rng(0)
    vals, rows = {}, {}
    n = 10
    for a in (2.0, 4.0):
        vals[("target_edit", "p", a)] = (target_effect + rng.normal(0, 0.2, n)).tolist()
        for c in stats.CONTROLS:
            eff = target_effect if c == weak else 0.0
            vals[(c, "p", a)] = (eff + rng.normal(0, 0.2, n)).tolist()
    cells = cells_from(vals)
    prompts = [[1, 1, 1]] * n
    for a in (2.0, 4.0):
        rows[a] = {"target_edit": prompts if hit_effect else [[0, 0, 0]] * n}
        for c in stats.CONTROLS:
            rows[a][c] = [[0, 0, 0]] * n
    comp = pl.concat([_completions(r, alpha=a) for a, r in rows.items()])
    return stats.paired(cells, test=stats.PairedTest(n_boot=500)), stats.paired_hits(comp, test=stats.PairedTest(n_boot=500))


def test_verdict_supported():
    ps, ph = _verdict_inputs(3.0, 1.0)
    (v,) = stats.verdict(ps, ph, decision_alphas=[2, 4])
    assert v["verdict"] == stats.SUPPORTED and not v["failures"]
    assert v["logmass_wins"] and v["completions_wins"]


def test_verdict_shift_only_and_no_completions():
    ps, ph = _verdict_inputs(3.0, 0.0)
    (v,) = stats.verdict(ps, ph, decision_alphas=[2, 4])
    assert v["verdict"] == stats.SHIFT_ONLY
    assert {f["metric"] for f in v["failures"]} == {"completions"}
    (v2,) = stats.verdict(ps, None, decision_alphas=[2])
    assert v2["verdict"] == stats.SHIFT_ONLY
    assert "no completions" in v2["failures"][0]["reason"]


def test_verdict_names_failed_control_and_why():
    ps, ph = _verdict_inputs(3.0, 1.0, weak="random_delta")
    (v,) = stats.verdict(ps, ph, decision_alphas=[2, 4])
    assert v["verdict"] == stats.NOT_SUPPORTED
    failed = {(f["metric"], f["control"]) for f in v["failures"]}
    assert failed == {("logmass", "random_delta")}
    reason = v["failures"][0]["reason"]
    assert "one-sided p=" in reason and "CI" in reason
    assert "random_delta" in v["explanation"]


def test_verdict_uses_every_predeclared_alpha():
    """A win at one alpha does not rescue a loss at another pre-declared alpha."""
    ps, ph = _verdict_inputs(3.0, 1.0)
    ps_bad = ps.with_columns(
        pl.when(pl.col("alpha") == 4.0).then(pl.lit(0.5)).otherwise(pl.col("p_value"))
        .alias("p_value"))
    assert stats.verdict(ps_bad, ph, decision_alphas=[2])[0]["verdict"] == stats.SUPPORTED
    (v,) = stats.verdict(ps_bad, ph, decision_alphas=[2, 4])
    assert v["verdict"] == stats.NOT_SUPPORTED
    assert {f["alpha"] for f in v["failures"]} == {4.0}
    # an alpha with no data is a loss, not a skip
    (v8,) = stats.verdict(ps, ph, decision_alphas=[2, 8])
    assert v8["verdict"] == stats.NOT_SUPPORTED
    with pytest.raises(ValueError):
        stats.verdict(ps, ph, decision_alphas=[])


def test_verdict_negative_effect_is_not_a_win():
    ps, ph = _verdict_inputs(-3.0, 1.0)
    (v,) = stats.verdict(ps, ph, decision_alphas=[2])
    assert v["verdict"] == stats.NOT_SUPPORTED
    assert any("<= 0" in f["reason"] for f in v["failures"])


def test_format_summary_table_columns():
    cells = cells_from({(c, "p", a): [1.0, -1.0, 2.0]
                        for c, a in itertools.product(["target_edit", "noop"], [2.0, 4.0])})
    text = stats.format_summary_table(stats.summarize(cells, n_boot=100))
    header = text.splitlines()[0].split()
    assert header[:7] == ["method", "scaling", "condition", "alpha", "mean", "median", "positive"]
    assert len(text.splitlines()) == 2 + 4 and "2/3" in text


def test_verdict_skips_controls_marked_not_applicable():
    import polars as pl

    from steercmp import stats

    rows = []
    for control in ("noop", "unrelated_edit"):
        rows.append({"method": "prompting", "scaling": "raw", "alpha": 2.0, "control": control, "n": 8,
                     "mean_diff": 1.0, "ci_low": 0.5, "ci_high": 1.5, "p_value": 0.004, "min_p": 2.0 ** -8})
    paired = pl.DataFrame(rows)
    base = stats.verdict(paired, None, decision_alphas=[2.0], methods=[("prompting", "raw")])[0]
    assert base["verdict"] == "not supported"  # missing random_delta / wrong_position count as losses
    v = stats.verdict(paired, None, decision_alphas=[2.0], methods=[("prompting", "raw")],
                      not_applicable={"prompting": ["random_delta", "wrong_position"]})[0]
    assert v["verdict"] == "probability shift only"
    assert v["controls_not_applicable"] == ["random_delta", "wrong_position"]
