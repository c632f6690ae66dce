"""A prompt the positive control cannot patch is dropped, visibly, and the run goes on.

The kit's battery ends with ``lake_gleam``: its first line ends on ``gleam``, two tokens under
the kit's tokenizer (KIT_SPLITS), and no candidate rhyme has two, so no counterfactual couplet
keeps the prompt's positions. Before, that raised a ConfigError and stopped the whole run.
"""

import json

import polars as pl
import pytest

from steercmp.lm.couplet_counterfactual import NoCounterfactual, build_counterfactual
from steercmp.plugin_manager import build_plugin_manager
from steercmp.report import write_report
from steercmp.testing import (
    KIT_SPLITS,
    TINY_BATTERY,
    check_method,
    run_experiment,
    save_tiny_checkpoint,
    tiny_battery,
    tiny_lm,
    write_tiny_experiment,
)
from steercmp.testing.running import TINY_BUILTINS
from steercmp_plugins.counterfactual import CounterfactualPatch, CounterfactualText

DROPPED = "lake_gleam"
BUILTINS = (*TINY_BUILTINS, "steercmp_plugins.counterfactual")


def test_no_same_length_counterfactual_is_its_own_error():
    lm = tiny_lm()
    prompt = tiny_battery().by_id()[DROPPED]
    with pytest.raises(NoCounterfactual, match="tokenizes to the prompt's length"):
        build_counterfactual(lm.tokenizer, prompt, "edited")


def test_the_kit_meets_a_dropped_prompt():
    for cls, role in ((CounterfactualPatch, "positive_control"), (CounterfactualText, "ceiling")):
        report = check_method(cls)
        for family in ("edited", "unrelated"):
            p = report.proposal(DROPPED, family)
            assert p.status == "dropped" and p.delta is None and p.prompt_text is None
            assert p.meta["role"] == role and "tokenizes to the prompt's length" in p.meta["reason"]
            assert report.proposal("stream_dream", family).status != "dropped"


@pytest.fixture(scope="module")
def dropped_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pc-drop")
    ckpt = save_tiny_checkpoint(root / "ckpt", tiny_battery(), splits=KIT_SPLITS)
    exp = write_tiny_experiment(root, ckpt, battery=TINY_BATTERY, layer=2,
                                methods=["counterfactual_patch", "unembed_direction"],
                                controls=["noop", "random_delta"], decision={"alphas": [2], "random_draws": 2})
    runner, cells = run_experiment(exp, root / "run", builtins=BUILTINS)
    return root, runner, cells


def test_the_run_goes_on_without_that_prompt_s_patch(dropped_run):
    root, runner, cells = dropped_run
    assert not runner.failures
    patch = cells.filter((pl.col("method") == "counterfactual_patch") & (pl.col("condition") == "target_edit"))
    dropped = patch.filter(pl.col("prompt_id") == DROPPED)
    assert dropped.height and (dropped["status"] == "dropped").all() and dropped["score"].is_null().all()
    assert patch.filter(pl.col("prompt_id") != DROPPED)["score"].is_not_null().all()
    # no patch, no budget: every direction on that prompt is no_budget; the other prompts match
    m = pl.read_parquet(root / "run" / "matched.parquet")
    there = m.filter((pl.col("prompt_id") == DROPPED) & (pl.col("condition") != "noop"))
    assert there.height and set(there["status"]) <= {"no_budget", "dropped"}
    assert "matched" in set(m.filter(pl.col("prompt_id") != DROPPED)["status"])


def test_the_verdict_counts_the_prompt_as_no_effect(dropped_run):
    root, _, _ = dropped_run
    out = write_report(root / "run", n_boot=200,
                       plugins=build_plugin_manager(builtins=BUILTINS, entry_points=False))
    verdict = {v["method"]: v for v in json.loads((out / "verdict.json").read_text())["verdicts"]}
    assert verdict["unembed_direction"]["n_itt"] == 4 and verdict["unembed_direction"]["n_selected"] == 3
