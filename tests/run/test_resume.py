"""Kill-and-resume: SIGKILL a real ``steercmp run`` in the middle of its stages, several times at
random points, rerun the same command, and get the same bytes as an uninterrupted run.

Also: changing one part of the config recomputes only what depends on it, and ``--fresh``
ignores the cache.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from steercmp.testing import COUPLET_BATTERY as BATTERY
from steercmp.testing import run_experiment as run
from steercmp.testing import save_tiny_checkpoint
from steercmp.testing import write_tiny_experiment as write_experiment

ROOT = Path(__file__).resolve().parents[2]

# six prompts: the score and completion stages each have six units to be killed between
PROMPTS = [dict(p) for p in BATTERY["prompts"]]
for p in list(PROMPTS):
    PROMPTS.append({**p, "id": p["id"] + "_b", "text": p["text"].replace("And ", "And then ", 1)})
RESUME_BATTERY = {"name": "resume", "prompts": PROMPTS}


def _experiment(tmp: Path, ckpt: Path) -> Path:
    (tmp / "battery.yaml").write_text(yaml.safe_dump(RESUME_BATTERY))
    exp = {"name": "resume", "model": {"id": str(ckpt)}, "layer": 1, "battery": "battery.yaml",
           "alphas": [-1, 0, 2], "scalings": ["raw", "norm_relative"], "methods": ["unembed_direction"],
           "completions": {"seeds": 2, "alphas": [0, 2], "max_new_tokens": 4}, "decision": {"alphas": [2]}}
    (tmp / "exp.yaml").write_text(yaml.safe_dump(exp))
    return tmp / "exp.yaml"


def _cmd(exp: Path, out: Path) -> list[str]:
    # the report stage is left out: it is recomputed from the tables, which are what must match
    return [sys.executable, "-m", "steercmp", "run", str(exp), "--out", str(out), "--no-progress"]


def _units(out: Path) -> dict[str, int]:
    return {s: len(list((out / "units" / s).glob("*.parquet"))) for s in ("score", "completions")}


def _kill_when(proc: subprocess.Popen, out: Path, event: tuple[str, int], jitter: float) -> str:
    """Wait for ``event`` (a file, or a number of finished units of a stage), then SIGKILL after
    ``jitter`` seconds. Returns what the run directory held when the kill landed."""
    kind, n = event
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if kind == "file" and (out / "activations.safetensors").exists():
            break
        if kind in ("score", "completions") and _units(out)[kind] >= n:
            break
        time.sleep(0.01)
    time.sleep(jitter)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return f"killed after {event} +{jitter:.2f}s: units {_units(out)}"
    return f"finished before the kill ({event})"


def test_kill_at_random_points_then_resume_is_byte_identical(tmp_path):
    words = [w for p in BATTERY["prompts"] for fam in p["families"].values() for w in fam]
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", words=words)
    exp = _experiment(tmp_path, ckpt)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

    ref = tmp_path / "ref"
    done = subprocess.run(_cmd(exp, ref), capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr

    rng = random.Random(7)
    out = tmp_path / "killed"
    events = [("file", 0), ("score", rng.randint(1, 3)), ("score", rng.randint(4, 5)),
              ("completions", rng.randint(1, 3)), ("completions", rng.randint(4, 5))]
    log = []
    for event in events:
        proc = subprocess.Popen(_cmd(exp, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, env=env)
        what = _kill_when(proc, out, event, jitter=rng.uniform(0.0, 0.15))
        err = proc.stderr.read()
        reuse = re.findall(r"\[(score|completions)\] \d+ units \(method x prompt\): (\d+) reused", err)
        log.append({"kill": what, "reused_by_this_attempt": reuse})
    final = subprocess.run(_cmd(exp, out), capture_output=True, text=True, env=env, check=False)
    assert final.returncode == 0, final.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    log.append({"final": True, "reused_stages": manifest["reused_stages"],
                "reused_units": manifest["reused_units"]})
    print(json.dumps(log, indent=1))  # the measured resume behaviour (pytest -s shows it)
    (tmp_path / "resume-log.json").write_text(json.dumps(log, indent=1))

    for table in ("cells.parquet", "completions.parquet", "activations.safetensors"):
        assert (out / table).read_bytes() == (ref / table).read_bytes(), table
    # finished work was reused: some attempt after a mid-stage kill picked up finished units
    reused_counts = [int(n) for entry in log for _stage, n in entry.get("reused_by_this_attempt", [])]
    reused_counts += [v["reused"] for v in manifest["reused_units"].values()]
    assert any(n > 0 for n in reused_counts), log
    killed = [e for e in log if str(e.get("kill", "")).startswith("killed")]
    assert len(killed) >= 3, log


def test_changing_alphas_reuses_extract_and_propose(tmp_path, tiny_ckpt):  # noqa: F811
    exp = write_experiment(tmp_path, tiny_ckpt)
    run(exp, tmp_path / "r")
    exp2 = write_experiment(tmp_path, tiny_ckpt, alphas=[-1, 0, 2, 4])
    runner, cells = run(exp2, tmp_path / "r")
    assert "extract" in runner.reused and "propose:unembed_direction" in runner.reused
    assert runner.reused_units["score"] == {"reused": 0, "computed": 3}
    # completions only sample alphas 0 and 2: the whole stage is reused
    assert "completions" in runner.reused
    assert set(cells["alpha"]) == {-1.0, 0.0, 2.0, 4.0}


def test_changing_one_method_option_reproposes_only_that_method(tmp_path, tiny_ckpt):  # noqa: F811
    methods = [{"name": "unembed_direction", "label": "a"}, {"name": "unembed_direction", "label": "b"}]
    exp = write_experiment(tmp_path, tiny_ckpt, methods=methods, completions={"enabled": False})
    run(exp, tmp_path / "r", steps=("extract", "propose", "score"))
    methods[1]["options"] = {"norm_fraction": 0.5}
    exp = write_experiment(tmp_path, tiny_ckpt, methods=methods, completions={"enabled": False})
    runner, _ = run(exp, tmp_path / "r", steps=("extract", "propose", "score"))
    assert "propose:a" in runner.reused and "propose:b" not in runner.reused
    assert runner.reused_units["score"] == {"reused": 3, "computed": 3}  # method a's units kept


def test_fresh_ignores_the_cache(tmp_path, tiny_ckpt):  # noqa: F811
    exp = write_experiment(tmp_path, tiny_ckpt, completions={"enabled": False})
    run(exp, tmp_path / "r", steps=("extract", "propose", "score"))
    runner, _ = run(exp, tmp_path / "r", steps=("extract", "propose", "score"), fresh=True)
    assert runner.reused == [] and runner.reused_units["score"] == {"reused": 0, "computed": 3}


def test_prune_removes_only_unreferenced_units(tmp_path, tiny_ckpt):  # noqa: F811
    exp = write_experiment(tmp_path, tiny_ckpt)
    run(exp, tmp_path / "r")
    exp2 = write_experiment(tmp_path, tiny_ckpt, alphas=[-1, 0, 2, 4])
    runner, _ = run(exp2, tmp_path / "r")
    units = sorted((tmp_path / "r" / "units").rglob("*.parquet"))
    removed = runner.prune_units()
    assert removed and set(removed) < set(units)
    assert all(p.parent.name == "score" for p in removed)  # the old alphas' score units
    again, _ = run(exp2, tmp_path / "r")
    assert {"score", "completions"} <= set(again.reused)  # everything still referenced was kept


def test_unit_keys_cover_the_code_that_builds_and_scores_cells(tmp_path, tiny_ckpt, monkeypatch):  # noqa: F811
    """Editing steercmp/run/cells.py (cell building, unsteered dedup) changes every score unit key."""
    from steercmp.run import keys

    exp = write_experiment(tmp_path, tiny_ckpt)
    runner, _ = run(exp, tmp_path / "r", steps=("extract", "propose"))
    before = runner.keys.score_unit("unembed_direction", "stream_dream")
    real = keys._file_digest

    def edited(path):
        return "edited" if path.name == "cells.py" and path.parent.name == "run" else real(path)

    monkeypatch.setattr(keys, "_file_digest", edited)
    assert runner.keys.score_unit("unembed_direction", "stream_dream") != before
    assert "steercmp.run.cells" in keys.STAGE_CODE["score"] and "steercmp.run.cells" in keys.STAGE_CODE["completions"]
