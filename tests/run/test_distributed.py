"""Sharded runs (2 CPU processes) merge into the same files a single process writes."""

from pathlib import Path

import attrs
import polars as pl
import pytest
import torch

from steercmp.battery import Battery
from steercmp.config import Experiment, MethodSpec
from steercmp.run.distributed import PluginSpec, run_sharded, shard_prompt_ids
from steercmp.run.runner import Runner
from steercmp.testing import save_tiny_checkpoint, words_of

NOTE8 = "experiments/batteries/note8.yaml"
PLUGINS = PluginSpec(builtins=("steercmp_plugins.controls", "steercmp_plugins.unembed"), entry_points=False)
#: methods that look across prompts: SAE feature scales, NLA baselines, diffmean's means
CROSS_PROMPT = PluginSpec(builtins=("steercmp_plugins.controls", "steercmp_plugins.sae", "steercmp_plugins.nla",
                                    "steercmp_plugins.diffmean"), entry_points=False)


def test_shard_prompt_ids_contiguous_and_complete():
    ids = [f"p{i}" for i in range(7)]
    shards = shard_prompt_ids(ids, 3, align=1)
    assert [i for s in shards for i in s] == ids
    assert [len(s) for s in shards] == [2, 3, 2]
    assert shard_prompt_ids(ids[:1], 4) == [["p0"]]
    with pytest.raises(ValueError):
        shard_prompt_ids(ids, 0)


def test_shards_are_cut_between_sampling_groups():
    """A sampling group (prompts whose unsteered completions share a batch) never straddles two
    shards, so a shard draws its texts in the batches a single run draws them in."""
    ids = [f"p{i}" for i in range(40)]
    shards = shard_prompt_ids(ids, 3, align=4)
    assert [i for s in shards for i in s] == ids
    assert [len(s) for s in shards] == [12, 16, 12]
    assert shard_prompt_ids(ids[:6], 4, align=4) == [ids[:4], ids[4:6]]


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
    steps = ("extract", "propose", "score", "completions", "match")
    single = Runner(experiment, PLUGINS.build(), tmp_path / "single", progress=False, log=lambda m: None)
    single.run(steps)
    assert not single.failures
    cells, failures = run_sharded(experiment, tmp_path / "sharded", 2, plugins=PLUGINS, steps=steps, threads=1)
    assert not failures
    assert (tmp_path / "sharded" / "shards" / "1" / "cells.parquet").exists()
    for name in ("cells.parquet", "completions.parquet", "activations.safetensors", "contexts.json",
                 "proposals/unembed_direction.json", "proposals/half.safetensors",
                 "matched.parquet", "matched_completions.parquet"):  # match runs once, after the merge
        a = (tmp_path / "single" / name).read_bytes()
        b = (tmp_path / "sharded" / name).read_bytes()
        assert a == b, name
    assert cells is not None and cells.height == 8 * 2 * 5 * 3 * 2
    # the merged directory is a finished single-process run: rerunning reuses every stage
    rerun = Runner(experiment, PLUGINS.build(), tmp_path / "sharded", progress=False, log=lambda m: None)
    rerun.run(steps)
    assert set(rerun.reused) >= {"extract", "propose:unembed_direction", "propose:half", "score", "completions",
                                 "match"}
    assert (tmp_path / "sharded" / "cells.parquet").read_bytes() == (tmp_path / "single" / "cells.parquet").read_bytes()


def test_unsteered_rows_are_sampled_a_whole_group_at_a_time(experiment, tmp_path, monkeypatch):
    """Every sampling call gets one group of prompts (``completions.prompt_group`` consecutive
    battery prompts), also when a resumed run lacks one prompt of a group: in bf16 a text depends
    on its batch, so the batch is the group, whoever asks for it."""
    from steercmp.run import stage_completions as stage

    exp = attrs.evolve(experiment, completions=attrs.evolve(experiment.completions, prompt_group=3))
    ids = [p.id for p in exp.battery.prompts]
    groups = [ids[0:3], ids[3:6], ids[6:8]]
    baseline_calls: list[list[str]] = []
    sampling_calls: list[list[str]] = []
    real_baselines, real_completions = stage.sample_baselines, stage.sample_completions

    def baselines(lm, sampling, prompts, **kw):
        baseline_calls.append([pid for pid, _ in prompts])
        return real_baselines(lm, sampling, prompts, **kw)

    def completions(lm, sampling, cells, families, **kw):
        sampling_calls.append(sorted({c.prompt_id for c in cells}, key=ids.index))
        return real_completions(lm, sampling, cells, families, **kw)

    monkeypatch.setattr(stage, "sample_baselines", baselines)
    monkeypatch.setattr(stage, "sample_completions", completions)
    torch.set_num_threads(1)
    steps = ("extract", "propose", "score", "completions")
    run = Runner(exp, PLUGINS.build(), tmp_path / "run", progress=False, log=lambda m: None)
    run.run(steps)
    assert baseline_calls == groups and sampling_calls == groups
    before = (tmp_path / "run" / "completions.parquet").read_bytes()
    # one prompt's units lost: its whole group's unsteered rows are drawn again, as before
    (tmp_path / "run" / "completions.parquet").unlink()
    for name in [f"baseline-{run.keys.completion_baseline(ids[4])}",
                 *(run.keys.completion_unit(m.key, ids[4]) for m in exp.methods)]:
        run.rundir.unit("completions", name).unlink()
    baseline_calls.clear()
    rerun = Runner(exp, PLUGINS.build(), tmp_path / "run", progress=False, log=lambda m: None)
    rerun.run(steps)
    assert baseline_calls == [groups[1]]
    assert (tmp_path / "run" / "completions.parquet").read_bytes() == before


def test_methods_that_look_across_prompts_are_shard_invariant(experiment, tmp_path):
    """sae_features (scales over the battery), nla_text_edit (tiny pair) and diffmean
    (contexts: all) propose once on the whole battery, so 2 processes equal 1, byte for byte."""
    from steercmp_plugins.nla.tiny_pair import write_pair
    from steercmp_plugins.sae.tiny_sae import write_random_sae

    av, ar = write_pair(tmp_path / "nla", layer=2, hidden=64)
    sae = write_random_sae(tmp_path / "sae", layer=2)
    exp = attrs.evolve(experiment, methods=(
        MethodSpec("sae_features", {"path": str(sae), "k": 3}),
        MethodSpec("nla_text_edit", {"av": str(av), "ar": str(ar), "n_explanations": 2, "max_new_tokens": 4,
                                     "selection": "default"}),
        MethodSpec("diffmean", {"contexts": "all"})), scalings=("raw",))
    torch.set_num_threads(1)
    single = Runner(exp, CROSS_PROMPT.build(), tmp_path / "single", progress=False, log=lambda m: None)
    single.run(("extract", "propose", "score"))
    assert not single.failures, [f.one_line() for f in single.failures]
    cells, failures = run_sharded(exp, tmp_path / "sharded", 2, plugins=CROSS_PROMPT,
                                  steps=("extract", "propose", "score"), threads=1)
    assert not failures and cells is not None
    assert set(cells["method"].unique()) == {"sae_features", "nla_text_edit", "diffmean"}
    for name in ("cells.parquet", "proposals/sae_features.safetensors", "proposals/nla_text_edit.json",
                 "proposals/diffmean.safetensors"):
        assert (tmp_path / "single" / name).read_bytes() == (tmp_path / "sharded" / name).read_bytes(), name
    # each shard scored only its own prompts, from the whole-battery proposals
    shard0 = pl.read_parquet(tmp_path / "sharded" / "shards" / "0" / "cells.parquet")
    assert set(shard0["prompt_id"]) == {p.id for p in exp.battery.prompts[:4]}
