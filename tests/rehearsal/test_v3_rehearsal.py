"""A rehearsal of the V3 run: the shipped ``experiments/gemma3-12b-v3.yaml`` end to end on a
shape-faithful miniature (Gemma3ForConditionalGeneration, 48 blocks, layer 32, the 262,208-row
vocabulary and real tokenizer, a released-layout NLA pair, a JumpReLU SAE), once with local
directories and once, unmodified, from a Hugging Face cache under the real ids with the hub
offline. Each ends with exit 0 and a complete report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from steercmp_plugins import v3_rehearsal

pytestmark = pytest.mark.integration

METHODS = {"counterfactual_patch", "nla_text_edit", "sae_features", "unembed_direction"}


@pytest.fixture(scope="module")
def miniature(tmp_path_factory):
    return v3_rehearsal.build(tmp_path_factory.mktemp("v3-mini"))


def _steercmp(args, cwd, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "steercmp", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, check=False)


def _complete(run):
    verdict = json.loads((run / "report" / "verdict.json").read_text())
    assert "partial" not in verdict
    assert {v["method"] for v in verdict["verdicts"]} >= METHODS
    assert (run / "report" / "summary.md").read_text().startswith("# steercmp report: gemma3-12b-v3")
    assert (run / "report" / "report.html").stat().st_size > 0 and (run / "matched.parquet").exists()
    config = (run / "config.yaml").read_text()
    assert "layer: 32" in config
    return verdict


def test_v3_config_with_local_directories(miniature, tmp_path):
    config = v3_rehearsal.local_config(miniature, tmp_path / "exp")
    done = _steercmp(["run", str(config), "--out", str(tmp_path / "run"), "--no-progress"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    _complete(tmp_path / "run")
    again = _steercmp(["run", str(config), "--out", str(tmp_path / "run"), "--no-progress"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    reused = json.loads((tmp_path / "run" / "manifest.json").read_text())["reused_stages"]
    assert {"extract", "score", "completions", "match"} <= set(reused)  # the resume recomputes nothing


def test_unmodified_v3_config_from_the_hf_cache_offline(miniature, tmp_path):
    cache = v3_rehearsal.hub_cache(miniature, tmp_path / "hub")
    config = v3_rehearsal.hub_config(tmp_path / "exp")
    assert config.read_text() == v3_rehearsal.v3_text()
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    plan = _steercmp(["plan", str(config)], tmp_path, env)
    assert plan.returncode == 0, plan.stderr
    sources = plan.stdout[plan.stdout.index("artefacts"):].splitlines()[1:5]
    assert all("Hugging Face cache" in line for line in sources), sources
    done = _steercmp(["run", str(config), "--out", str(tmp_path / "run"), "--no-progress"], tmp_path, env)
    assert done.returncode == 0, done.stderr[-3000:]
    _complete(tmp_path / "run")
    empty = _steercmp(["plan", str(config)], tmp_path, {**env, "HF_HUB_CACHE": str(tmp_path / "empty")})
    assert empty.returncode == 2 and "is not in the Hugging Face cache" in empty.stderr
    assert len(empty.stderr.strip().splitlines()) == 1
