"""Sharded runs (2 CPU processes) merge into the same files a single process writes."""

from pathlib import Path

import pytest
import torch

from steercmp.battery import Battery
from steercmp.config import Experiment
from steercmp.run.distributed import PluginSpec, run_sharded, shard_prompt_ids
from steercmp.run.runner import Runner
from steercmp.testing import save_tiny_checkpoint, words_of

NOTE8 = "experiments/batteries/note8.yaml"
PLUGINS = PluginSpec(builtins=("steercmp_plugins.controls", "steercmp_plugins.unembed"), entry_points=False)


def test_shard_prompt_ids_contiguous_and_complete():
    ids = [f"p{i}" for i in range(7)]
    shards = shard_prompt_ids(ids, 3)
    assert [i for s in shards for i in s] == ids
    assert [len(s) for s in shards] == [2, 3, 2]
    assert shard_prompt_ids(ids[:1], 4) == [["p0"]]
    with pytest.raises(ValueError):
        shard_prompt_ids(ids, 0)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    battery = Battery.from_yaml(NOTE8)
    words = set()
    for p in battery.prompts:
        words.update(words_of(p.text))
        for ws in p.families.values():
            words.update(w.lower() for w in ws)
    model_dir = save_tiny_checkpoint(root / "model", words=sorted(words), vocab_size=2048)
    return Experiment.from_dict({
        "name": "dist", "seed": 3, "layer": 2, "battery": str(Path(NOTE8).resolve()),
        "model": {"id": str(model_dir)}, "alphas": [-1, 0, 2], "scalings": ["raw", "norm_relative"],
        "batch_size": 16, "decision": {"alphas": [2]},
        "completions": {"seeds": 2, "alphas": [0, 2], "max_new_tokens": 3},
        "methods": [{"name": "unembed_direction"}, {"name": "unembed_direction", "label": "half",
                                                     "options": {"norm_fraction": 0.5}}],
        "controls": ["noop", "random_delta", "wrong_position"],
    }, source=str(root / "dist.yaml"))



def test_two_processes_equal_single_process_byte_for_byte(experiment, tmp_path):
    torch.set_num_threads(1)
    steps = ("extract", "propose", "score", "completions")
    single = Runner(experiment, PLUGINS.build(), tmp_path / "single", progress=False, log=lambda m: None)
    single.run(steps)
    assert not single.failures
    cells, failures = run_sharded(experiment, tmp_path / "sharded", 2, plugins=PLUGINS, steps=steps, threads=1)
    assert not failures
    assert (tmp_path / "sharded" / "shards" / "1" / "cells.parquet").exists()
    for name in ("cells.parquet", "completions.parquet", "activations.safetensors", "contexts.json",
                 "proposals/unembed_direction.json", "proposals/half.safetensors"):
        a = (tmp_path / "single" / name).read_bytes()
        b = (tmp_path / "sharded" / name).read_bytes()
        assert a == b, name
    assert cells is not None and cells.height == 8 * 2 * 5 * 3 * 2
    # the merged directory is a finished single-process run: rerunning reuses every stage
    rerun = Runner(experiment, PLUGINS.build(), tmp_path / "sharded", progress=False, log=lambda m: None)
    rerun.run(steps)
    assert set(rerun.reused) >= {"extract", "propose:unembed_direction", "propose:half", "score", "completions"}
    assert (tmp_path / "sharded" / "cells.parquet").read_bytes() == (tmp_path / "single" / "cells.parquet").read_bytes()
