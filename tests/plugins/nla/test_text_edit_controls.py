"""paraphrase_edit and round_trip through the runner and the report, on a hidden-layout tiny pair
(the loader and code path of the released 12B pair): text-edit methods get them, others record
not_applicable, the round trip is one operation at alpha 1, and both enter the decision rule."""

import json
from pathlib import Path

import polars as pl
import pytest

from steercmp.battery import Battery
from steercmp.config import Experiment
from steercmp.plugin_manager import build_plugin_manager
from steercmp.report.writer import write_report
from steercmp.run.runner import Runner
from steercmp.testing import save_tiny_checkpoint, words_of

NOTE8 = "experiments/batteries/note8.yaml"
PLUGINS = ("steercmp_plugins.controls", "steercmp_plugins.unembed", "steercmp_plugins.nla")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from steercmp_plugins.nla.av import ActivationVerbalizer
    from steercmp_plugins.nla.tiny_pair import write_pair

    root = tmp_path_factory.mktemp("text_edit")
    battery = Battery.from_yaml(NOTE8)
    words, originals = set(), []
    for p in battery.prompts:
        words.update(words_of(p.text))
        for ws in p.families.values():
            words.update(w.lower() for w in ws)
        originals.extend(p.families["original"])
    model_dir = save_tiny_checkpoint(root / "model", words=sorted(words), vocab_size=2048)
    av, ar = write_pair(root / "nla", layer=2, hidden=64)
    # the tiny AV cannot write English: every explanation names the plan words (so every prompt is
    # editable and the paraphrase rules have framing words to reword)
    text = "the line ends with a word, so the next line should rhyme, planning " + " or ".join(originals)
    mp = pytest.MonkeyPatch()
    mp.setattr(ActivationVerbalizer, "explain", lambda self, vectors, **kw: [(text, "raw", True)] * len(vectors))
    exp = Experiment.from_dict({
        "name": "text_edit", "seed": 3, "layer": 2, "battery": str(Path(NOTE8).resolve()),
        "model": {"id": str(model_dir)}, "alphas": [0, 2], "scalings": ["raw"], "batch_size": 16,
        "decision": {"alphas": [2]}, "completions": {"seeds": 2, "alphas": [2], "max_new_tokens": 2},
        "methods": [{"name": "nla_text_edit", "options": {"av": str(av), "ar": str(ar), "n_explanations": 1,
                                                          "max_new_tokens": 4}},
                    {"name": "unembed_direction"}],
        "controls": ["noop", "random_delta", "wrong_position", "paraphrase_edit", "round_trip"],
    }, source=str(root / "text_edit.yaml"))
    runner = Runner(exp, build_plugin_manager(builtins=PLUGINS, entry_points=False), root / "run",
                    progress=False, log=lambda m: None)
    runner.run(("extract", "propose", "score", "completions"))
    mp.undo()
    assert not runner.failures, [f.one_line() for f in runner.failures]
    write_report(root / "run", n_boot=200)
    return root / "run"


def test_text_edit_conditions_in_cells(finished_run):
    cells = pl.read_parquet(finished_run / "cells.parquet")
    nla = cells.filter(pl.col("method") == "nla_text_edit")
    for cond in ("paraphrase_edit", "round_trip"):
        rows = nla.filter(pl.col("condition") == cond)
        assert rows.height == 8 * 2 and set(rows["status"]) == {"editable"}, cond
        assert rows["score"].is_not_null().all()
        other = cells.filter((pl.col("method") == "unembed_direction") & (pl.col("condition") == cond))
        assert set(other["status"]) == {"not_applicable"} and other["score"].is_null().all()
    rt = nla.filter(pl.col("condition") == "round_trip")
    # one operation, not a dose: alpha 0 and alpha 2 cells are the same injection at alpha 1
    wide = rt.pivot(on="alpha", index="prompt_id", values="score")
    assert (wide["0.0"] - wide["2.0"]).abs().max() < 1e-9
    assert all(json.loads(m)["alpha_applies"] is False and json.loads(m)["fixed_alpha"] == 1.0 for m in rt["meta"])
    noop = nla.filter(pl.col("condition") == "noop")
    assert (rt["score"].sort() != noop["score"].sort()).any()  # it does inject something
    assert noop["kl_unsteered"].max() < 1e-5 and rt["kl_unsteered"].min() > 0
    para = nla.filter((pl.col("condition") == "paraphrase_edit") & (pl.col("alpha") == 2.0))
    assert all("aiming for" in json.loads(m)["paraphrase_text"] for m in para["meta"])


def test_text_edit_controls_enter_the_decision_rule(finished_run):
    verdict = json.loads((finished_run / "report" / "verdict.json").read_text())
    by_method = {v["method"]: v for v in verdict["verdicts"]}
    assert {"paraphrase_edit", "round_trip"} <= set(by_method["nla_text_edit"]["controls"])
    assert {"paraphrase_edit", "round_trip"} <= set(by_method["unembed_direction"]["controls_not_applicable"])
    html = (finished_run / "report" / "report.html").read_text()
    assert "NLA: fidelity, paraphrase and round trip" in html and "target &gt; paraphrase" in html


def test_round_trip_sampled_once_at_alpha_one(finished_run):
    comp = pl.read_parquet(finished_run / "completions.parquet")
    rt = comp.filter((pl.col("method") == "nla_text_edit") & (pl.col("condition") == "round_trip"))
    assert rt.height == 8 * 2 and rt["text"].is_not_null().all()
