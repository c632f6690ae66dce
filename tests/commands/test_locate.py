"""``steercmp locate`` on a tiny Gemma 3 checkpoint: outputs, known truths of activation patching,
resumable units, and bad inputs (exit 2, one line, the output directory unchanged)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import polars as pl
import pytest
import yaml

from steercmp.cli import main
from steercmp.testing import COUPLET_BATTERY as BATTERY
from steercmp.testing import save_tiny_checkpoint

N_LAYERS = 4  # the tiny config's depth
# hill_still's edited family is its own line-end word: no swap counterfactual exists (a bad-input case)
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


def test_counterfactual_of_another_length(located, capsys):
    battery = json.loads(json.dumps(GOOD))
    battery["prompts"][0]["families"]["edited"] = ["sun-beam"]
    battery["prompts"][0]["edits"]["edited"] = {"dream": "sun-beam"}
    exp = _experiment(located["root"], located["ckpt"], battery, name="unequal")
    err = _bad(located, capsys, ["--constructions", "swap", "--families", "edited"], exp=exp)
    assert "stream_dream.families.edited" in err and "tokenizes to the prompt's length" in err


def test_no_counterfactual_word_at_all(located, capsys):
    exp = _experiment(located["root"], located["ckpt"], BATTERY, name="self")
    err = _bad(located, capsys, [], exp=exp)
    assert "hill_still.families.edited" in err and "fix:" in err


def test_unknown_family(located, capsys):
    err = _bad(located, capsys, ["--families", "plan"])
    assert "--families" in err
