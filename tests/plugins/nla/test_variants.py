"""Two configured variants of nla_text_edit (the second oracle-assisted, under another label)
explain the same activations with the same draws, sampled once per run: a paired comparison
that costs one AV pass."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import torch

from steercmp.battery import Battery
from steercmp.config import Experiment
from steercmp.run.distributed import PluginSpec
from steercmp.run.runner import Runner
from steercmp.testing import save_tiny_checkpoint, words_of
from steercmp_plugins.nla.av import ActivationVerbalizer
from steercmp_plugins.nla.tiny_pair import write_pair

NOTE8 = "experiments/batteries/note8.yaml"
PLUGINS = PluginSpec(builtins=("steercmp_plugins.controls", "steercmp_plugins.nla"), entry_points=False)


def _experiment(root: Path, av: Path, ar: Path) -> Experiment:
    battery = Battery.from_yaml(NOTE8)
    words = {w for p in battery.prompts for w in words_of(p.text)}
    words |= {w.lower() for p in battery.prompts for ws in p.families.values() for w in ws}
    model_dir = save_tiny_checkpoint(root / "model", words=sorted(words), vocab_size=2048)
    opts = {"av": str(av), "ar": str(ar), "n_explanations": 2, "max_new_tokens": 4, "selection": "default"}
    return Experiment.from_dict({
        "name": "variants", "seed": 5, "layer": 2, "battery": str(Path(NOTE8).resolve()),
        "model": {"id": str(model_dir)}, "alphas": [0, 2], "scalings": ["raw"], "decision": {"alphas": [2]},
        "methods": [{"name": "nla_text_edit", "options": opts},
                    {"name": "nla_text_edit", "label": "oracle", "options": dict(opts, cue_edit=True)}],
        "controls": ["noop"],
    }, source=str(root / "variants.yaml"))


def _explanations(run: Path, label: str) -> list[tuple[str, int, str]]:
    df = pl.read_parquet(run / "methods" / label / "explanations.parquet").sort("prompt_id", "sample")
    return list(df.select("prompt_id", "sample", "explanation").iter_rows())


def test_variants_share_one_set_of_explanations(tmp_path, monkeypatch):
    av, ar = write_pair(tmp_path / "nla", layer=2, hidden=64)
    exp = _experiment(tmp_path, av, ar)
    calls = []
    explain = ActivationVerbalizer.explain

    def counted(self, vectors, **kwargs):
        calls.append(len(vectors))
        return explain(self, vectors, **kwargs)

    monkeypatch.setattr(ActivationVerbalizer, "explain", counted)
    torch.set_num_threads(1)
    run = tmp_path / "run"
    runner = Runner(exp, PLUGINS.build(), run, progress=False, log=lambda m: None)
    runner.run(("extract", "propose"))
    assert not runner.failures, [f.one_line() for f in runner.failures]
    plain, oracle = _explanations(run, "nla_text_edit"), _explanations(run, "oracle")
    assert plain == oracle and len(plain) == 2 * len(exp.battery.prompts)
    assert sum(calls) == len(plain)  # one AV pass for both variants
    assert len(list((run / "shared_cache").glob("nla_explanations-*.json"))) == 1
    assert len(list((run / "shared_cache").glob("fve_baseline-*.json"))) == 1  # the base model's, once
    assert not list(run.glob("methods/*/cache/*"))

    # --fresh: the first variant samples again, the second reuses what this run just drew
    calls.clear()
    fresh = Runner(exp, PLUGINS.build(), run, progress=False, log=lambda m: None, fresh=True)
    fresh.run(("extract", "propose"))
    assert sum(calls) == len(plain)
    assert _explanations(run, "oracle") == plain

    # alone under its own label, the oracle variant draws the same explanations: the stream is
    # keyed by the plugin's name, not the label
    alone = Experiment.from_dict({**exp.raw, "methods": exp.raw["methods"][1:]}, source=exp.source)
    Runner(alone, PLUGINS.build(), tmp_path / "alone", progress=False, log=lambda m: None).run(("extract", "propose"))
    assert _explanations(tmp_path / "alone", "oracle") == plain


def test_a_pair_built_by_the_first_load_still_shares_its_explanations(tmp_path, monkeypatch):
    """A cold run: the AV's files do not exist until its load builds them (the mini pair), so the
    first variant samples first and stores its draws under the key the built files give; the
    second variant reuses them."""
    from steercmp_plugins.nla.text_edit import NlaTextEdit

    av, ar = write_pair(tmp_path / "nla", layer=2, hidden=64)
    exp = _experiment(tmp_path, av, ar)
    stamp = NlaTextEdit._av_stamp
    asked: list[int] = []

    def not_built_at_first(self):  # noqa: ANN001, ANN202
        asked.append(1)
        return None if len(asked) == 1 else stamp(self)

    calls = []
    explain = ActivationVerbalizer.explain
    monkeypatch.setattr(NlaTextEdit, "_av_stamp", not_built_at_first)
    monkeypatch.setattr(ActivationVerbalizer, "explain", lambda self, v, **kw: calls.append(len(v)) or explain(self, v, **kw))
    torch.set_num_threads(1)
    run = tmp_path / "run"
    Runner(exp, PLUGINS.build(), run, progress=False, log=lambda m: None).run(("extract", "propose"))
    assert _explanations(run, "nla_text_edit") == _explanations(run, "oracle")
    assert sum(calls) == 2 * len(exp.battery.prompts)  # sampled once, by the first variant
    assert len(list((run / "shared_cache").glob("nla_explanations-*.json"))) == 1
