"""``steercmp locate`` on a tiny Gemma 3 checkpoint: outputs, known truths of activation patching,
resumable units, and bad inputs (exit 2, one line, the output directory unchanged)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import polars as pl
import pytest
import yaml
from filelock import FileLock

from steercmp.cli import main
from steercmp.testing import COUPLET_BATTERY as BATTERY
from steercmp.testing import save_tiny_checkpoint

N_LAYERS = 4  # the tiny config's depth
# hill_still's edited family is its own line-end word: no swap counterfactual exists (it is dropped)
GOOD = {**BATTERY, "prompts": [p for p in BATTERY["prompts"] if p["id"] != "hill_still"]}


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _experiment(root: Path, ckpt: Path, battery: dict, name: str = "exp") -> Path:
    (root / f"{name}-battery.yaml").write_text(yaml.safe_dump(battery))
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny-locate", "model": {"id": str(ckpt)}, "layer": 1,
                                    "battery": f"{name}-battery.yaml", "alphas": [0, 1], "scalings": ["raw"],
                                    "methods": ["unembed_direction"], "completions": {"enabled": False},
                                    "decision": {"alphas": [1]}}))
    return path


@pytest.fixture(scope="module")
def located(tmp_path_factory):
    root = tmp_path_factory.mktemp("locate")
    words = [w for p in BATTERY["prompts"] for fam in p["families"].values() for w in fam] + ["sun", "beam"]
    ckpt = save_tiny_checkpoint(root / "ckpt", words=words)
    exp = _experiment(root, ckpt, GOOD)
    out = root / "out"
    assert main(["locate", str(exp), "--out", str(out), "--no-progress"]) == 0
    return {"root": root, "ckpt": ckpt, "exp": exp, "out": out}


def test_locate_writes_every_output(located, capsys):
    out = located["out"]
    for name in ("locate.parquet", "locate_summary.parquet", "heatmap.png", "locate.html"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    records = pl.read_parquet(out / "locate.parquet")
    assert sorted(records["layer"].unique().to_list()) == list(range(N_LAYERS))
    assert set(records["family"].unique().to_list()) == {"edited", "unrelated"}
    # stream_dream's edited family rhymes with its plan: swap and block; the unrelated family does not: cue
    constructions = records.filter(pl.col("prompt_id") == "stream_dream").group_by("family").agg(
        pl.col("construction").unique().sort())
    got = {r["family"]: r["construction"] for r in constructions.iter_rows(named=True)}
    assert got == {"edited": ["block", "swap"], "unrelated": ["cue"]}
    summary = pl.read_parquet(out / "locate_summary.parquet")
    assert {"mean_shift", "ci_low", "ci_high", "n_positive", "mean_ceiling"} <= set(summary.columns)


def test_patching_knows_its_truths(located):
    """At the last block's output only the slot reaches the logits: patching the slot there gives
    the counterfactual's own score (shift == ceiling), patching any other position changes nothing."""
    records = pl.read_parquet(located["out"] / "locate.parquet").filter(pl.col("layer") == N_LAYERS - 1)
    slot = records.filter(pl.col("label") == "slot")
    other = records.filter(pl.col("label") != "slot")
    assert slot.height and other.height
    assert (slot["shift"] - slot["ceiling"]).abs().max() < 1e-3
    assert other["shift"].abs().max() < 1e-3


def test_rerun_reuses_finished_layers(located, capsys):
    units = located["out"] / "units" / "locate"
    before = {p.name: p.stat().st_mtime_ns for p in units.iterdir()}
    assert len(before) == N_LAYERS
    assert main(["locate", str(located["exp"]), "--out", str(located["out"]), "--no-progress"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in units.iterdir()} == before


def _bad(located, capsys, args: list[str], *, exp: Path | None = None) -> str:
    before = _tree(located["out"])
    code = main(["locate", str(exp or located["exp"]), "--out", str(located["out"]), "--no-progress", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert _tree(located["out"]) == before
    return err


def test_layer_outside_the_model(located, capsys):
    err = _bad(located, capsys, ["--layers", "2-9"])
    assert "--layers" in err and "layer 4 is outside the model (0..3)" in err


def test_offset_past_the_prompt(located, capsys):
    err = _bad(located, capsys, ["--offsets", "0:40"])
    assert "--offsets" in err and "past prompt" in err


def test_a_pair_without_a_counterfactual_is_dropped_and_recorded(located, capsys):
    """As ``run``'s positive control drops its prompt, locate drops a (prompt, family,
    construction) with no same-length counterfactual, scans the rest and says why in locate.json."""
    battery = json.loads(json.dumps(GOOD))
    battery["prompts"][0]["families"]["edited"] = ["sun-beam"]
    battery["prompts"][0]["edits"]["edited"] = {"dream": "sun-beam"}
    exp = _experiment(located["root"], located["ckpt"], battery, name="unequal")
    out = located["root"] / "dropped"
    code = main(["locate", str(exp), "--out", str(out), "--no-progress", "--constructions", "swap",
                 "--families", "edited", "--layers", "3"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    meta = json.loads((out / "locate.json").read_text())
    assert [(d["prompt_id"], d["family"], d["construction"]) for d in meta["dropped"]] == [
        ("stream_dream", "edited", "swap")]
    assert "tokenizes to the prompt's length" in meta["dropped"][0]["reason"]
    assert "dropped prompt 'stream_dream'" in captured.err and "1 counterfactuals dropped" in captured.out
    ids = set(pl.read_parquet(out / "locate.parquet")["prompt_id"].unique().to_list())
    assert "stream_dream" not in ids and ids == {p["id"] for p in battery["prompts"][1:]}


def test_nothing_left_to_scan(located, capsys):
    only = {**BATTERY, "prompts": [p for p in BATTERY["prompts"] if p["id"] == "hill_still"]}
    exp = _experiment(located["root"], located["ckpt"], only, name="self")
    err = _bad(located, capsys, ["--families", "edited", "--constructions", "swap"], exp=exp)
    assert "no prompt has a same-length counterfactual" in err and "hill_still" in err and "fix:" in err


def test_locate_is_on_the_run_machinery(located, capsys):
    """One writer per directory, a manifest of what ran and was reused, and never into a run's
    directory (its manifest would be overwritten)."""
    manifest = json.loads((located["out"] / "manifest.json").read_text())
    assert manifest["reused_units"]["locate"] == {"reused": N_LAYERS, "computed": 0}  # the rerun above
    assert "locate" in manifest["stage_keys"] and manifest["memory"]
    with FileLock(str(located["out"] / ".steercmp.lock")):
        err = _bad(located, capsys, [])
    assert "another steercmp process is writing" in err
    run_dir = located["root"] / "a-run"
    run_dir.mkdir()
    (run_dir / "cells.parquet").write_bytes(b"")
    code = main(["locate", str(located["exp"]), "--out", str(run_dir), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "holds a run of `steercmp run`" in err and len(err.splitlines()) == 1


def test_unknown_family(located, capsys):
    err = _bad(located, capsys, ["--families", "plan"])
    assert "--families" in err
