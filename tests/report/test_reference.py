"""The positive control on top: the site banner, verdict order, the ceiling kept out of the
verdicts, and fractions of the positive control's effect, on synthetic runs with known truth."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import yaml

from steercmp import stats
from steercmp.plugin_manager import build_plugin_manager
from steercmp.report import write_report

N = 12
CONDITIONS = ["target_edit", "noop", "random_delta"]


def cells(pc_effect: float, half_method: bool = True, seed: int = 0) -> pl.DataFrame:
    """counterfactual_patch moves the score by ``pc_effect`` on every prompt; ``half`` by half of
    it; ``counterfactual_text`` (the ceiling) by 4; controls and alpha 0 by nothing."""
    rng = np.random.default_rng(seed)
    methods = {"counterfactual_patch": (1.0, "positive_control"), "counterfactual_text": (4.0 / max(pc_effect, 1e-9),
                                                                                          "ceiling")}
    if half_method:
        methods["half"] = (0.5, None)
    rows = []
    for m, (share, role) in methods.items():
        meta = json.dumps({"role": role} if role else {})
        for i in range(N):
            base = -3.0 + 0.5 * i  # between-prompt spread much larger than the effects
            for c in CONDITIONS:
                for a in (0.0, 2.0):
                    effect = share * pc_effect if (c == "target_edit" and a > 0) else 0.0
                    if m == "counterfactual_text" and c == "target_edit":
                        effect = 4.0
                    score = base + effect + float(rng.normal(0, 0.05))
                    rows.append(dict(prompt_id=f"p{i:02d}", method=m, condition=c, alpha=a, scaling="raw", position=5,
                                     inject_pos=5, score_pos=9, delta_norm=1.0, logmass_edited=score - 5.0,
                                     logmass_original=-5.0, logmass_unrelated=-7.0, score=score, status="ok",
                                     meta=meta if c == "target_edit" else "{}"))
    return pl.DataFrame(rows)


def _run(tmp_path, frame: pl.DataFrame):
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    frame.write_parquet(run / "cells.parquet")
    (run / "config.yaml").write_text(yaml.safe_dump({"name": "pc", "decision": {"alphas": [2.0]}}))
    return write_report(run, n_boot=500, plugins=build_plugin_manager(builtins=(), entry_points=False))


def test_working_positive_control_is_on_top_and_sets_the_scale(tmp_path):
    out = _run(tmp_path, cells(pc_effect=1.0))
    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["positive_control"] == "counterfactual_patch" and verdict["ceilings"] == ["counterfactual_text"]
    assert verdict["site"].startswith("The site can be steered")
    methods = [v["method"] for v in verdict["verdicts"]]
    assert methods[0] == "counterfactual_patch" and "counterfactual_text" not in methods
    assert verdict["verdicts"][0]["role"] == stats.POSITIVE_CONTROL
    frac = pl.read_parquet(out / "positive_control.parquet").filter(pl.col("alpha") == 2.0)
    by = {r["method"]: r for r in frac.iter_rows(named=True)}
    assert by["counterfactual_patch"]["fraction"] == pytest.approx(1.0)
    assert by["half"]["fraction"] == pytest.approx(0.5, abs=0.05)
    assert by["half"]["median_prompt_fraction"] == pytest.approx(0.5, abs=0.1)
    assert by["counterfactual_text"]["mean_effect"] == pytest.approx(4.0, abs=0.05)
    md = (out / "summary.md").read_text()
    assert md.index("The site can be steered") < md.index("## Verdicts") < md.index("## Against the positive control")
    assert "counterfactual_patch · raw (positive control)" in md
    assert md.index("## Against the positive control") < md.index("## What this battery can show")
    logmass = pl.read_parquet(out / "absolute_logmass.parquet")
    assert {"logmass_original", "logmass_edited", "logmass_unrelated"} <= set(logmass.columns)


def test_failing_positive_control_is_said_first(tmp_path):
    out = _run(tmp_path, cells(pc_effect=0.0, half_method=False))
    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["site"].startswith("The site cannot be steered by anything tested")
    md = (out / "summary.md").read_text()
    assert md.index("cannot be steered by anything tested") < md.index("## Verdicts")
    html = (out / "report.html").read_text()
    assert html.index("cannot be steered by anything tested") < html.index("id='verdicts'")


def test_positive_control_that_loses_while_a_method_wins_is_not_called_unsteerable(tmp_path):
    """A noisy norm-matched random push can beat the positive control while a method wins: the
    banner must say the site can be steered, not that nothing steers it."""
    frame = cells(pc_effect=0.0)
    # give "half" its own effect: it wins, the positive control (no effect) does not
    frame = frame.with_columns(pl.when((pl.col("method") == "half") & (pl.col("condition") == "target_edit")
                                       & (pl.col("alpha") > 0)).then(pl.col("score") + 1.0)
                               .otherwise(pl.col("score")).alias("score"))
    verdict = json.loads((_run(tmp_path, frame) / "verdict.json").read_text())
    assert verdict["site"].startswith("The positive control does not win here")
    assert "half · raw" in verdict["site"] and "loses to noop" in verdict["site"]


def test_no_positive_control_is_named_as_a_gap(tmp_path):
    frame = cells(pc_effect=1.0).filter(pl.col("method") == "half")
    out = _run(tmp_path, frame)
    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["positive_control"] is None and "No positive control" in verdict["site"]
    assert not (out / "positive_control.parquet").exists()


def test_underpowered_positive_control_cannot_say_either_way(tmp_path):
    frame = cells(pc_effect=1.0).filter(pl.col("prompt_id").is_in(["p00", "p01", "p02"]))
    verdict = json.loads((_run(tmp_path, frame) / "verdict.json").read_text())
    assert verdict["site"].startswith("Cannot tell whether this site can be steered")


def test_cosine_with_the_positive_control_is_read_from_the_proposals(tmp_path):
    """A method pointing along the positive control's delta has cosine 1, one pointing against
    it -1; a dropped proposal and a prompting method (no delta) have no row."""
    import torch

    from steercmp.api import Proposal
    from steercmp.run.proposals import save_proposals
    from steercmp.run.rundir import RunDir

    frame = cells(pc_effect=1.0)
    frame = pl.concat([frame, frame.filter(pl.col("method") == "half").with_columns(pl.lit("against").alias("method"))])
    run = RunDir(tmp_path / "run")
    (tmp_path / "run" / "proposals").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    pcs = {f"p{i:02d}": torch.randn(16, generator=g) for i in range(N)}

    def props(sign, dropped=()):
        return [Proposal(prompt_id=pid, family="edited", status="dropped") if pid in dropped else
                Proposal(prompt_id=pid, family="edited", delta=(sign * 0.5 * d).contiguous()) for pid, d in pcs.items()]

    save_proposals(run, "counterfactual_patch", props(1.0))
    save_proposals(run, "half", props(1.0, dropped={"p00"}))
    save_proposals(run, "against", props(-1.0))
    save_proposals(run, "counterfactual_text", [Proposal(prompt_id=pid, family="edited", prompt_text="x")
                                                for pid in pcs])
    out = _run(tmp_path, frame)
    cos = pl.read_parquet(out / "positive_control_cosine.parquet")
    by = cos.group_by("method").agg(pl.len(), pl.col("cosine").min().alias("lo"), pl.col("cosine").max().alias("hi"))
    by = {r["method"]: r for r in by.iter_rows(named=True)}
    assert set(by) == {"half", "against"}
    assert by["half"]["len"] == N - 1 and by["half"]["lo"] == pytest.approx(1.0, abs=1e-6)
    assert by["against"]["hi"] == pytest.approx(-1.0, abs=1e-6)
    assert "cosine of each method's target delta with counterfactual_patch" in (out / "summary.md").read_text()
