"""The benchmark: every path agrees with steercmp's sweep, and the JSON/table come out."""

import argparse
import json

import pytest
import torch

from steercmp.battery import Battery
from steercmp.bench import grid, scoring_paths, suite
from steercmp.commands import bench
from steercmp.lm.hooks import Injection
from steercmp.lm.load import LoadedModel
from steercmp.score.sample import Decoding, generate_rows
from steercmp.testing import couplet_tokenizer as tiny_tokenizer
from steercmp.testing import tiny_model, words_of

NOTE8 = "experiments/batteries/note8.yaml"


def _words(battery):
    out = set()
    for p in battery.prompts:
        out.update(words_of(p.text))
        for ws in p.families.values():
            out.update(w.lower() for w in ws)
    return out


@pytest.fixture
def tiny_battery_lm():
    battery = Battery.from_yaml(NOTE8)
    lm = LoadedModel(model=tiny_model(seed=1), tokenizer=tiny_tokenizer(_words(battery)), source="tiny",
                     path="", dtype=torch.float32, device="cpu")
    return battery, lm


def test_subsample_covers_every_condition_and_alpha():
    idx = grid.subsample(560, 70, 35)
    assert len(idx) <= 70 and idx[0] == 0
    assert {i % 35 for i in idx} == set(range(35)) or len(idx) < 35


def test_smoke_bench_on_tiny_model(tmp_path, tiny_battery_lm, capsys):
    battery, lm = tiny_battery_lm
    out = tmp_path / "bench.json"
    args = argparse.Namespace(out=str(out), battery=NOTE8, smoke=True, layer=2)
    assert bench.main(args, lm=lm) == 0
    data = json.loads(out.read_text())
    assert data["all_agree"]
    assert set(data["agreement"]) == {"a", "b", "c"}
    for key in ("a", "b", "c", "d", "bound", "bound_with_branches"):
        assert data["timings"][key]["cells_per_s"] > 0
    assert set(data["targets"]) == {"d/a", "d/b", "d/c", "d/bound", "completions"}
    assert data["completions"]["samples_batched"] > 0
    assert "none available" in data["environment"]["gpu"] or data["environment"]["gpu"]
    assert "met" in capsys.readouterr().out


def test_quick_bench_samples_the_slow_baselines_only(tmp_path, tiny_battery_lm, capsys):
    """--quick: (d) and the bounds on every cell, (a), (b), (c) on sampled cells, every ratio printed."""
    battery, lm = tiny_battery_lm
    out = tmp_path / "bench.json"
    args = argparse.Namespace(out=str(out), battery=NOTE8, quick=True, layer=2)
    assert bench.main(args, lm=lm) == 0
    data = json.loads(out.read_text())
    n = len(battery.prompts) * len(grid.CONDITIONS) * len(grid.ALPHAS)
    assert data["mode"] == "quick" and data["all_agree"]
    assert data["timings"]["d"]["cells"] == data["timings"]["bound"]["cells"] == n
    for key, cells in suite.QUICK.items():
        path = {"loop_cells": "a", "nnsight_cells": "b", "batched_cells": "c"}[key]
        assert data["timings"][path]["cells"] <= min(cells, n) and data["timings"][path]["sampled"]
    printed = capsys.readouterr().out
    for ratio in ("d/a", "d/b", "d/c", "d/bound", "completions"):
        assert ratio in printed


def test_bench_fails_loudly_on_disagreement(tmp_path, tiny_battery_lm, monkeypatch):
    battery, lm = tiny_battery_lm
    real = suite.loop_scores

    def broken(*a, **k):
        out = real(*a, **k)
        out["edited"] = out["edited"] + 1e-2
        return out

    monkeypatch.setattr(suite, "loop_scores", broken)
    args = argparse.Namespace(out=str(tmp_path / "b.json"), battery=NOTE8, smoke=True, layer=2,
                              no_completions=True)
    assert bench.main(args, lm=lm) == 1
    assert not json.loads((tmp_path / "b.json").read_text())["agreement"]["a"]["ok"]


def test_generate_rows_shared_prefix_equals_full_prefill(tiny_battery_lm):
    _battery, lm = tiny_battery_lm
    context = [2] + list(range(10, 24))
    g = torch.Generator().manual_seed(0)
    inj = Injection.build(torch.randn(4, 64, generator=g) * 3, [0.0, 1.0, 2.0, -1.0], [5, 6, 5, 9])
    runs = []
    for share in (True, False):
        gens = [torch.Generator().manual_seed(i) for i in range(4)]
        runs.append(generate_rows(lm, 2, context, inj, gens, Decoding(6, 1.0, stop_on_newline=False),
                                  share_prefix=share))
    assert runs[0] == runs[1]
    # a row's text does not depend on the rows batched with it
    alone = generate_rows(lm, 2, context, inj.select([2]), [torch.Generator().manual_seed(2)],
                          Decoding(6, 1.0, stop_on_newline=False))
    assert alone[0] == runs[0][2]


def test_left_padded_unsteered_batch_equals_one_context_at_a_time(tiny_battery_lm):
    """Contexts of different lengths sampled in one left-padded batch give the tokens each
    context gives alone (fp32), rows finishing early included."""
    from steercmp.score.sample import generate_unsteered

    _battery, lm = tiny_battery_lm
    contexts = [[2] + list(range(10, 24)), [2, 30, 31, 32], [2] + list(range(40, 49))]
    seeds = [0, 1, 2]
    batched = generate_unsteered(lm, contexts, [torch.Generator().manual_seed(s) for s in seeds],
                                 Decoding(6, 1.0, stop_on_newline=False))
    for ctx, seed, toks in zip(contexts, seeds, batched, strict=True):
        zero = Injection.build(torch.zeros(1, 64), [0.0], [len(ctx) - 1])
        alone = generate_rows(lm, 2, ctx, zero, [torch.Generator().manual_seed(seed)],
                              Decoding(6, 1.0, stop_on_newline=False))
        assert toks == alone[0] and len(toks) == 6
    # with stopping on: rows that finish leave the batch, the others go on unchanged
    many = [contexts[i % 3] for i in range(12)]
    batched = generate_unsteered(lm, many, [torch.Generator().manual_seed(s) for s in range(12)],
                                 Decoding(8, 2.0))
    for s, (ctx, toks) in enumerate(zip(many, batched, strict=True)):
        zero = Injection.build(torch.zeros(1, 64), [0.0], [len(ctx) - 1])
        assert toks == generate_rows(lm, 2, ctx, zero, [torch.Generator().manual_seed(s)], Decoding(8, 2.0))[0]


@pytest.mark.slow
def test_smoke_bench_on_embedded_model(tmp_path, embedded_lm):
    args = argparse.Namespace(out=str(tmp_path / "bench.json"), battery=NOTE8, smoke=True)
    assert bench.main(args, lm=embedded_lm) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["all_agree"] and data["grid"]["layer"] == 12


def test_nnsight_path_leaves_the_model_untouched(tiny_battery_lm):
    from steercmp.lm.hooks import attached_hooks

    _battery, lm = tiny_battery_lm
    forward = lm.model.forward
    scoring_paths.wrap_nnsight(lm)
    assert lm.model.forward == forward and attached_hooks(lm.model) == 0


def test_generate_rows_drops_finished_rows_without_changing_the_others(tiny_battery_lm):
    _battery, lm = tiny_battery_lm
    context = [2] + list(range(10, 24))
    nl = lm.tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    g = torch.Generator().manual_seed(1)
    inj = Injection.build(torch.randn(6, 64, generator=g), [0.0, 1.0, 2.0, -1.0, 3.0, 0.5], [5, 6, 5, 9, 7, 8])
    row = lm.model.get_output_embeddings().weight[nl].clone()
    for scale in (60, 30, 15, 8, 4, 2):  # make the newline likely enough that rows finish at different steps
        with torch.no_grad():
            lm.model.get_output_embeddings().weight[nl] = row * scale
        gens = [torch.Generator().manual_seed(10 + i) for i in range(6)]
        batched = generate_rows(lm, 2, context, inj, gens, Decoding(8, 1.0))
        lengths = {len(t) for t in batched}
        if len(lengths) > 1:
            break
    assert len(lengths) > 1 and all(len(t) <= 8 for t in batched)
    for i in range(6):
        alone = generate_rows(lm, 2, context, inj.select([i]), [torch.Generator().manual_seed(10 + i)],
                              Decoding(8, 1.0))
        assert alone[0] == batched[i]
        assert batched[i][-1] == nl or len(batched[i]) == 8
