"""The first report before the builds: methods with nothing to build are proposed, scored,
matched and reported first (marked partial; the alpha sweep's completions wait for the full run); a run killed during a slow build leaves that
report readable, and the next ``steercmp run`` resumes, reuses their units and drops the mark."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import polars as pl
import pytest

from steercmp.testing import write_tiny_experiment

pytestmark = pytest.mark.integration

SLOW_PLUGIN = '''
import os, time
from pathlib import Path
from steercmp.hookspecs import hookimpl
from steercmp_plugins.unembed import UnembedDirection


class SlowBuild(UnembedDirection):
    """unembed_direction behind a fake build: pending until the build has run once."""
    name = "slow_build"

    def pending_build(self):
        return None if Path(os.environ["SLOW_BUILT"]).exists() else "a fake slow build"

    def propose(self, contexts, runtime):
        Path(os.environ["SLOW_STARTED"]).write_text("building")
        deadline = time.time() + 120
        while not Path(os.environ["SLOW_RELEASE"]).exists() and time.time() < deadline:
            time.sleep(0.1)
        Path(os.environ["SLOW_BUILT"]).write_text("built")
        return super().propose(contexts, runtime)


@hookimpl
def register_methods(register):
    register(SlowBuild)
'''


def _wait_for(path, proc, seconds=180):
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def test_partial_report_before_a_slow_build_then_resume(tmp_path, tiny_ckpt):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "slow.py").write_text(SLOW_PLUGIN)
    exp = write_tiny_experiment(tmp_path, tiny_ckpt, methods=["unembed_direction", "prompting", "slow_build"],
                                controls=["noop", "random_delta"], decision={"alphas": [2], "random_draws": 2})
    env = {**os.environ, "SLOW_BUILT": str(tmp_path / "built"), "SLOW_STARTED": str(tmp_path / "started"),
           "SLOW_RELEASE": str(tmp_path / "release")}
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "steercmp", "--plugins-dir", str(plugins), "run", str(exp), "--out", str(run),
           "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(tmp_path / "started", proc)  # the slow build has begun: the partial report is already out
        summary = (run / "report" / "summary.md").read_text()
        verdict = json.loads((run / "report" / "verdict.json").read_text())
        assert "PARTIAL REPORT: slow_build not included yet (waiting for a fake slow build)" in summary
        # the first answer waits for no sampling it does not need: the alpha sweep's completions
        # come with the full run, the matched completions (the verdict's behavioural check) are here
        assert "The alpha sweep's sampled completions of the methods that inject" in summary
        # a prompt has no dose: the match stage reads a prompting method's completions as sampled,
        # so those are sampled first, and only those
        sampled = pl.read_parquet(run / "completions.parquet")
        assert set(sampled["method"]) == {"prompting"}
        partial = pl.read_parquet(run / "matched_completions.parquet").filter(pl.col("method") == "prompting")
        assert partial.filter(pl.col("condition") == "target_edit").height == 3 * 2 * 2  # prompts x seeds x scalings
        assert verdict["partial"]["pending"] == ["slow_build"]
        assert {v["method"] for v in verdict["verdicts"]} == {"unembed_direction", "prompting"}
        assert (run / "report" / "report.html").read_text().count("PARTIAL REPORT") >= 1
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C during the build
        proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert json.loads((run / "report" / "verdict.json").read_text())["partial"]["pending"] == ["slow_build"]
    assert (run / "pending.json").exists()

    (tmp_path / "release").write_text("go")
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr
    # the resumed run recomputes nothing of unembed_direction's, nor the shared controls
    assert "[score] 9 units (method x prompt): 6 reused, 3 to compute" in done.stderr
    assert "[match] 12 units (prompt x method, and shared controls): 9 reused, 3 to dose-match" in done.stderr
    verdict = json.loads((run / "report" / "verdict.json").read_text())
    assert "partial" not in verdict and not (run / "pending.json").exists()
    assert {v["method"] for v in verdict["verdicts"]} == {"unembed_direction", "prompting", "slow_build"}
    assert "PARTIAL" not in (run / "report" / "summary.md").read_text()
    assert "[completions] 9 units (method x prompt): 3 reused, 6 to compute" in done.stderr
    final = pl.read_parquet(run / "matched_completions.parquet").filter(pl.col("method") == "prompting")
    assert final.sort(final.columns).equals(partial.sort(partial.columns))
    assert json.loads((run / "manifest.json").read_text())["timings_seconds"]["first_report"] > 0


BROKEN_PROMPT = '''
from steercmp.api import Method
from steercmp.hookspecs import hookimpl


class BrokenPrompt(Method):
    """A prompting method whose propose raises."""
    name = "broken_prompt"
    intervention = "prompt"
    description = "raises while proposing"

    def propose(self, contexts, runtime):
        raise RuntimeError("boom")


@hookimpl
def register_methods(register):
    register(BrokenPrompt)
'''


def test_a_prompting_method_that_fails_does_not_stop_the_first_report(tmp_path, tiny_ckpt):
    """The first pass samples the prompting methods' texts before the match stage; one whose
    proposals failed is recorded like any failed method, not looked up again."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "slow.py").write_text(SLOW_PLUGIN)
    (plugins / "broken.py").write_text(BROKEN_PROMPT)
    exp = write_tiny_experiment(tmp_path, tiny_ckpt, methods=["unembed_direction", "broken_prompt", "slow_build"],
                                controls=["noop", "random_delta"], decision={"alphas": [2], "random_draws": 2})
    (tmp_path / "release").write_text("go")  # the fake build finishes at once
    env = {**os.environ, "SLOW_BUILT": str(tmp_path / "built"), "SLOW_STARTED": str(tmp_path / "started"),
           "SLOW_RELEASE": str(tmp_path / "release")}
    done = subprocess.run([sys.executable, "-m", "steercmp", "--plugins-dir", str(plugins), "run", str(exp),
                           "--out", str(tmp_path / "run"), "--no-progress"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "partial report written" in done.stderr and "no proposals for method" not in done.stderr
    assert "method 'broken_prompt' raised while proposing: RuntimeError: boom" in done.stderr
    verdict = json.loads((tmp_path / "run" / "report" / "verdict.json").read_text())
    assert {v["method"] for v in verdict["verdicts"]} == {"unembed_direction", "slow_build"}
    # the manifest keeps the first pass's memory readings, first and marked, beside the full pass's
    memory = json.loads((tmp_path / "run" / "manifest.json").read_text())["memory"]
    first_pass = [e for e in memory if e.get("pass") == "first_report"]
    assert first_pass and memory[: len(first_pass)] == first_pass
    assert {"extract", "score", "match"} <= {e["stage"] for e in first_pass}
    assert any(e["stage"] == "score" for e in memory[len(first_pass):])
