"""The scale-out path users take on GPUs, ``accelerate launch --multi_gpu -m steercmp run``, run
on the CPU with two ranks (torchrun underneath, gloo): rank 0 proposes, both ranks score their
shard, rank 0 merges and matches. The cells equal a single process's (scores to float tolerance:
the ranks' thread counts differ). ``accelerate launch --cpu --num_processes 2`` is not this path:
without an MPI hostfile accelerate starts ONE process for it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from steercmp.testing import run_experiment, write_tiny_experiment

pytestmark = pytest.mark.integration


@pytest.mark.skipif(shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None,
                    reason="accelerate's launcher is not installed")
def test_accelerate_launch_on_cpu_gives_the_cells_of_one_process(tmp_path, tiny_ckpt):
    exp = write_tiny_experiment(tmp_path, tiny_ckpt, batch_size=16, controls=["noop", "random_delta"],
                                decision={"alphas": [2], "random_draws": 2})
    data = yaml.safe_load(exp.read_text())
    data.setdefault("completions", {})["prompt_group"] = 1  # 3 prompts: a process per prompt
    data["methods"] = ["unembed_direction", {"name": "unembed_direction", "label": "half",
                                             "options": {"norm_fraction": 0.5}}]
    exp.write_text(yaml.safe_dump(data))
    runner, single = run_experiment(exp, tmp_path / "single")
    assert not runner.failures and single is not None
    launcher = str(Path(sys.executable).parent / "accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "steercmp", "run", str(exp),
                           "--out", str(tmp_path / "launched"), "--no-progress"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    launched = pl.read_parquet(tmp_path / "launched" / "cells.parquet")
    keys = ["method", "prompt_id", "condition", "alpha", "scaling"]
    assert launched.select(keys).equals(single.select(keys))  # same rows, same single-process order
    for col in ("score", "logmass_edited", "logmass_original", "delta_norm"):
        a, b = launched[col].fill_null(0.0), single[col].fill_null(0.0)
        assert (a - b).abs().max() <= 1e-4 * max(1.0, float(b.abs().max())), col
    assert (tmp_path / "launched" / "matched.parquet").exists()
    assert (tmp_path / "launched" / "shards" / "1" / "cells.parquet").exists()  # it really sharded
