"""The decision layer on synthetic run directories with known truth, through `steercmp report`.

Each case writes cells.parquet and completions.parquet in the documented schema
(docs/schemas.md) and asserts the verdict a correct rule must give.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from steercmp import stats
from steercmp.cli import main

CONTROLS = ("noop", "unrelated_edit", "random_delta", "wrong_position")


def write_run(root: Path, effect: list[float | None], hits: list[tuple[float, float]] | None, *,
              statuses: list[str] | None = None, noise: float = 1.0, seed: int = 0) -> Path:
    """One method at alpha 2. ``effect[i]`` is prompt i's target shift over every control (None:
    the prompt is dropped); ``hits[i]`` the (target, control) edited-hit fraction over 4 seeds."""
    rng = np.random.default_rng(seed)
    statuses = statuses or ["ok"] * len(effect)
    cells, comps = [], []
    for i, (eff, status) in enumerate(zip(effect, statuses, strict=True)):
        pid = f"p{i:02d}"
        base = float(rng.normal(-5.0, 3.0))
        st = "dropped" if eff is None else status
        for cond in ("target_edit", *CONTROLS):
            score = None if eff is None else base + (eff if cond == "target_edit" else 0.0) + float(rng.normal(0, noise))
            cells.append(dict(prompt_id=pid, method="m", condition=cond, alpha=2.0, scaling="raw", position=3,
                              inject_pos=3, score_pos=9, delta_norm=1.0, logmass_edited=score,
                              logmass_original=0.0 if score is not None else None, logmass_unrelated=None,
                              score=score, status=st, meta="{}"))
            if hits is None:
                continue
            rate = hits[i][0] if cond == "target_edit" else hits[i][1]
            for seed_i in range(4):
                hit = None if eff is None else seed_i < round(rate * 4)
                comps.append(dict(prompt_id=pid, method="m", condition=cond, alpha=2.0, scaling="raw",
                                  seed=seed_i, text="", line="", hit_original=hit is False, hit_edited=hit,
                                  hit_unrelated=False, end_original=False, end_edited=hit, end_unrelated=False,
                                  status=st))
    run = root / "run"
    run.mkdir(parents=True)
    pl.DataFrame(cells).write_parquet(run / "cells.parquet")
    if comps:
        pl.DataFrame(comps).write_parquet(run / "completions.parquet")
    return run


def report(run: Path, *extra: str) -> dict:
    assert main(["report", str(run), "--alphas", "2", "--n-boot", "2000", *extra]) == 0
    (v,) = json.loads((run / "report" / "verdict.json").read_text())["verdicts"]
    return v


def test_strong_effect_on_seven_usable_prompts_is_supported(tmp_path):
    """8 prompts, one dropped: Holm over 4 controls made this impossible; the IUT does not."""
    v = report(write_run(tmp_path, [20.0] * 7 + [None], [(1.0, 0.0)] * 7 + [(0, 0)]))
    assert v["verdict"] == stats.SUPPORTED, v["explanation"]
    assert v["power"]["logmass"]["n"] == 7 and v["power"]["logmass"]["min_p"] == pytest.approx(2 ** -7)
    assert all(c["p_value"] == pytest.approx(2 ** -7) for c in v["checks"] if c["metric"] == "logmass")


def test_completion_ties_stay_in_the_exact_test(tmp_path):
    """6 prompts with more edited hits, 2 tied at 0 vs 0: one-sided exact p = 2^2 / 2^8."""
    hits = [(0.75, 0.0)] * 6 + [(0.0, 0.0)] * 2
    v = report(write_run(tmp_path, [20.0] * 8, hits))
    assert v["verdict"] == stats.SUPPORTED, v["explanation"]
    comp = [c for c in v["checks"] if c["metric"] == "completions"]
    assert all(c["n"] == 8 and c["p_value"] == pytest.approx(4 / 256) for c in comp)


def test_four_prompts_cannot_say_yes_and_say_underpowered(tmp_path, capsys):
    v = report(write_run(tmp_path, [30.0] * 4, [(1.0, 0.0)] * 4, noise=0.1))
    assert v["verdict"] == stats.UNDERPOWERED
    assert v["power"]["logmass"]["min_p"] == pytest.approx(1 / 16) and not v["power"]["logmass"]["reachable"]
    assert v["power"]["logmass"]["prompts_needed"] == 5 and "at least 5 usable prompts" in v["explanation"]
    md = (tmp_path / "run" / "report" / "summary.md").read_text()
    assert "underpowered" in md and "no (needs ≥ 5 prompts)" in md


def test_null_data_is_not_supported(tmp_path):
    v = report(write_run(tmp_path, [0.0] * 12, [(0.25, 0.25)] * 12, noise=2.0, seed=3))
    assert v["verdict"] == stats.NOT_SUPPORTED
    assert v["power"]["logmass"]["reachable"] and v["power"]["logmass"]["mde"] > 0


def test_fallback_rows_never_enter_the_verdict(tmp_path):
    """8 editable prompts without effect and 6 fallback prompts with a huge one: not supported;
    the fallback rows are summarised apart."""
    effect = [0.0] * 8 + [50.0] * 6
    statuses = ["editable"] * 8 + ["fallback"] * 6
    run = write_run(tmp_path, effect, [(0.25, 0.25)] * 8 + [(1.0, 0.0)] * 6, statuses=statuses, seed=5)
    v = report(run)
    assert v["verdict"] == stats.NOT_SUPPORTED and v["power"]["logmass"]["n"] == 8
    secondary = pl.read_parquet(run / "report" / "summary_secondary.parquet")
    target = secondary.filter(pl.col("condition") == "target_edit").row(0, named=True)
    assert target["n"] == 6 and target["mean"] > 0
    md = (run / "report" / "summary.md").read_text()
    assert "## Fallback and gated prompts (not in the verdicts)" in md
    assert "| m | fallback | 6 |" in md and "| m | editable | 8 |" in md
    # and the other way round: the editable prompts carry the effect, the fallback ones do not
    run2 = write_run(tmp_path / "b", [20.0] * 8 + [-50.0] * 6, [(1.0, 0.0)] * 14, statuses=statuses)
    assert report(run2)["verdict"] == stats.SUPPORTED


def test_holm_across_methods_is_an_option(tmp_path):
    run = write_run(tmp_path, [20.0] * 6, [(1.0, 0.0)] * 6, noise=0.1)
    assert report(run)["verdict"] == stats.SUPPORTED and report(run)["correction"] == "none"
    v = report(run, "--correction", "holm")
    assert v["correction"] == "holm" and v["verdict"] == stats.SUPPORTED  # one method: Holm changes nothing
    assert all(c["p_adjusted"] is not None for c in v["checks"])


@pytest.mark.parametrize(("args", "needle"), [
    (["--level", "1.5"], "--level: level 1.5 must lie strictly between 0 and 1"),
    (["--level", "0"], "must lie strictly between 0 and 1"),
    (["--correction", "bonferroni"], "--correction: correction 'bonferroni' is not one of none, holm"),
    (["--alphas", "3"], "--alphas: decision alpha 3 was not swept (the run has alphas 2)"),
])
def test_bad_decision_settings(tmp_path, capsys, args, needle):
    run = write_run(tmp_path, [1.0] * 6, None)
    assert main(["report", str(run), "--alphas", "2", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
    assert not (run / "report").exists()
