"""The matched-dose stage on a tiny whole run: shared random draws, the budget, ITT inputs, resume."""

import json

import polars as pl
import pytest

from steercmp.plugin_manager import build_plugin_manager
from steercmp.report import write_report
from steercmp.score.dose import TOLERANCE
from steercmp.testing import run_experiment as run
from steercmp.testing import write_tiny_experiment as write_experiment
from steercmp.testing.running import TINY_BUILTINS

BUDGET = 2e-3


@pytest.fixture(scope="module")
def matched_run(tmp_path_factory, tiny_ckpt):
    root = tmp_path_factory.mktemp("match")
    exp = write_experiment(
        root, tiny_ckpt, controls=["noop", "random_delta", "random_donor", "wrong_position"],
        methods=[{"name": "unembed_direction", "label": "unembed_a"},
                 {"name": "unembed_direction", "label": "unembed_b", "options": {"norm_fraction": 0.5}}],
        decision={"alphas": [2], "max_kl": BUDGET, "random_draws": 3})
    runner, cells = run(exp, root / "run")
    assert not runner.failures
    return root, exp, runner, cells


def test_every_direction_is_matched_to_the_budget(matched_run):
    root, _, _, _ = matched_run
    m = pl.read_parquet(root / "run" / "matched.parquet")
    live = m.filter(pl.col("status") == "matched")
    assert live.height and (live["budget"] == BUDGET).all()
    assert ((live["kl_offtarget"] >= BUDGET / TOLERANCE) & (live["kl_offtarget"] <= BUDGET * TOLERANCE)).all()
    assert set(live["condition"]) == {"target_edit", "unrelated_edit", "wrong_position", "random_delta",
                                      "random_donor"}
    # 3 prompts: 3 random draws, and at most 2 distinct donors per prompt
    per = m.filter(pl.col("method") == "unembed_a").group_by("prompt_id", "condition").len()
    assert per.filter(pl.col("condition") == "random_delta")["len"].to_list() == [3, 3, 3]
    assert per.filter(pl.col("condition") == "random_donor")["len"].to_list() == [2, 2, 2]
    # the score is the families' difference, and the noop row is the unsteered cells' noop
    assert (m["score"] - (m["logmass_edited"] - m["logmass_original"])).abs().max() < 1e-9
    cells = pl.read_parquet(root / "run" / "cells.parquet").filter(
        (pl.col("condition") == "noop") & (pl.col("method") == "unembed_a"))
    noop = m.filter((pl.col("condition") == "noop") & (pl.col("method") == "unembed_a")).sort("prompt_id")
    want = cells.group_by("prompt_id").agg(pl.col("score").first()).sort("prompt_id")
    assert (noop["score"] - want["score"]).abs().max() < 1e-4


def test_shared_random_draws_are_the_same_bar_for_every_method(matched_run):
    root, _, _, _ = matched_run
    m = pl.read_parquet(root / "run" / "matched.parquet").filter(
        pl.col("condition").is_in(["random_delta", "random_donor"]))
    cols = ["prompt_id", "condition", "draw", "multiplier", "score", "kl_offtarget"]
    a = m.filter(pl.col("method") == "unembed_a").select(cols).sort(cols[:3])
    b = m.filter(pl.col("method") == "unembed_b").select(cols).sort(cols[:3])
    assert a.equals(b)


def test_matched_completions_and_the_report(matched_run):
    root, _, _, _ = matched_run
    comp = pl.read_parquet(root / "run" / "matched_completions.parquet")
    assert {"target_edit", "noop", "random_delta", "wrong_position"} <= set(comp["condition"])
    assert comp.filter(pl.col("condition") == "random_delta")["method"].n_unique() == 2  # reported under both
    out = write_report(root / "run", n_boot=300,
                       plugins=build_plugin_manager(builtins=TINY_BUILTINS, entry_points=False))
    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["preregistered"] is True and "alpha_sweep" in verdict
    assert {v["method"] for v in verdict["verdicts"]} == {"unembed_a", "unembed_b"}
    for v in verdict["verdicts"]:
        assert v["n_itt"] == 3 and set(v["checks"]) >= {"noop", "random_delta", "random_donor"}
    summary = (out / "summary.md").read_text()
    assert len(summary.splitlines()) <= 60 and "Verdicts at matched side effects" in summary
    assert (out / "details.md").is_file() and (out / "pareto.png").is_file()
    # an override is an exploratory re-analysis, and says so
    out2 = write_report(root / "run", n_boot=300, level=0.1, out_dir=root / "explore",
                        plugins=build_plugin_manager(builtins=TINY_BUILTINS, entry_points=False))
    assert json.loads((out2 / "verdict.json").read_text())["preregistered"] is False
    assert "Exploratory re-analysis" in (out2 / "summary.md").read_text()


def test_rerun_reuses_the_match_stage(matched_run):
    root, exp, _, _ = matched_run
    before = (root / "run" / "matched.parquet").read_bytes()
    runner, _ = run(exp, root / "run")
    assert "match" in runner.reused
    assert (root / "run" / "matched.parquet").read_bytes() == before
