"""Selection, edits and the nla_text_edit method end to end on tiny checkpoints."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import steercmp.testing
from steercmp.api import Prompt, PromptContext, RunSettings
from steercmp.errors import ConfigError
from steercmp_plugins.nla import commands as cli
from steercmp_plugins.nla.editing import apply_edit, mentions, select_explanation
from steercmp_plugins.nla.meta import NlaMeta
from steercmp_plugins.nla.text_edit import NlaTextEdit, edit_texts, estimate_params


def test_apply_edit_word_boundary_and_case():
    edits = {"dream": "gleam", "seem": "beam"}
    text = "Dream of a dreamer; planning dream, SEEM or Seem (daydream)."
    out, n = apply_edit(text, edits)
    assert out == "Gleam of a dreamer; planning gleam, BEAM or Beam (daydream)."
    assert n == 4
    assert apply_edit("dream seem", {"dream": "seem", "seem": "dream"})[0] == "seem dream"
    assert mentions("the -eam sound, planning Dream", ["dream", "eam"]) == ["dream"]


def test_select_rules():
    expl = ["no plan here", "planning dream", "dream or seem"]
    scores = [0.9, 0.1, 0.5]
    assert select_explanation(expl, scores, ["dream"]) == ("editable", 2)
    assert select_explanation(expl[:1], scores[:1], ["dream"]) == ("fallback", 0)
    assert select_explanation(expl[:1], scores[:1], ["dream"], "strict") == ("dropped", None)


def test_nothing_to_edit_fabricates_nothing():
    """No template sentence is appended: an explanation without an editable term stays as it is."""
    orig, edited, mode, n = edit_texts("A line about water", {"dream": "gleam", "seem": "beam"})
    assert (orig, edited, mode, n) == ("A line about water", "A line about water", "none", 0)


def test_meta_accepts_training_spellings(pair_dir):
    raw = NlaMeta.from_yaml(pair_dir[1]).raw
    data = dict(raw, role="critic", prompt_templates={"critic": raw["prompt_templates"]["ar"]})
    data.pop("extraction_layer_index")
    data["critic"] = {"extraction_layer_index": 2}
    meta = NlaMeta.from_dict(data)
    assert meta.role == "ar" and meta.extraction_layer == 2
    with pytest.raises(ConfigError, match="role"):
        NlaMeta.from_dict(dict(raw, role="judge"))
    with pytest.raises(ConfigError, match="experiment uses layer 5"):
        meta.check_compatible(layer=5)


def test_estimates_for_released_pair():
    av = estimate_params("kitft/nla-gemma3-12b-L32-av", "av")
    ar = estimate_params("kitft/nla-gemma3-12b-L32-ar", "ar")
    params = 12_187_325_040  # google/gemma-3-12b-it in steercmp.catalog
    assert av == params and ar == int(params * 33 / 48 + 3840 * 3840)


def fake_runtime():
    """The kit's in-memory runtime on a tiny base model (d_model 64, layer 2)."""
    return steercmp.testing.TestRuntime(steercmp.testing.tiny_lm(), layer=2, method_key="nla_text_edit")


def _contexts(n=3, d=64, orig=("quux", "zorp")):
    torch.manual_seed(0)
    out = []
    for i in range(n):
        p = Prompt(id=f"p{i}", text="the stream ,\nand the",
                   families={"original": orig, "edited": ("gleam", "beam"),
                             "unrelated": ("stone", "bone")},
                   edits={"edited": dict(zip(orig, ("gleam", "beam"), strict=False)),
                          "unrelated": dict(zip(orig, ("stone", "bone"), strict=False))})
        out.append(PromptContext(prompt=p, input_ids=(2, 3, 4, 5), inject_pos=2, score_pos=3,
                                 layer=2, resid=torch.randn(4, d)))
    return out


def test_propose_with_fake_runtime(pair_dir):
    exp = RunSettings(layer=2, seed=0, model_id="tiny")
    m = NlaTextEdit({"av": str(pair_dir[0]), "ar": str(pair_dir[1]), "n_explanations": 2,
                     "max_new_tokens": 6, "selection": "default"}, exp)
    m.validate()
    res = m.resources()
    assert [r.name for r in res] == ["nla_av", "nla_ar"] and res[0].params > 0
    rt = fake_runtime()
    props = m.propose(_contexts(), rt)
    assert rt.loaded == ["nla_av", "nla_ar"]
    assert rt.captures == 1  # the dataset-level FVE baseline, read once with the base model
    assert len(props) == 12 and {p.family for p in props} == {"edited", "unrelated", "paraphrase", "round_trip"}
    for p in props:  # the tiny vocabulary cannot say quux/zorp: nothing to edit, nothing fabricated
        if p.family == "round_trip":  # the round trip needs no edit: h replaced by AR(original) at ||h||
            assert p.status == "fallback" and p.fixed_alpha == 1.0 and p.delta.shape == (64,)
            continue
        if p.family == "paraphrase":  # no built-in rule names tiny-vocabulary words: visibly dropped
            assert p.status == "dropped" and p.delta is None and "no paraphrase rule" in p.meta["reason"]
            continue
        assert p.status == "fallback" and p.delta.dtype == torch.float32 and p.delta.shape == (64,)
        assert p.meta["edit_mode"] == "none" and p.meta["replacements"] == 0
        assert float(p.delta.abs().max()) == 0.0 and p.meta["edited_text"] == p.meta["original_text"]
        json.dumps(dict(p.meta))
    expl = rt.tables["explanations"]
    assert len(expl) == 6 and set(expl[0]) == {"prompt_id", "sample", "explanation", "raw",
                                               "fve_nrm", "mse_nrm", "cosine", "mentions_editable"}
    sel = rt.tables["selections"]
    assert {r["selection"] for r in sel} == {"fallback"} and "unrelated_delta_norm" in sel[0]
    # the same run seeds give the same explanations
    rt2 = fake_runtime()
    m.propose(_contexts(), rt2)
    assert [r["explanation"] for r in rt2.tables["explanations"]] == [r["explanation"] for r in expl]

    strict = NlaTextEdit(dict(m.options, selection="strict"), exp)
    props = strict.propose(_contexts(), fake_runtime())
    assert len(props) == 12 and all(p.status == "dropped" and p.delta is None for p in props)
    assert NlaTextEdit({"av": "x", "ar": "y"}, exp).opts.selection == "strict"  # the default


def test_editable_explanations_are_edited(pair_dir, monkeypatch):
    """An explanation that names the plan is edited word for word and reconstructed: the delta is
    AR(edited) - AR(original) for every family, with the dataset-level FVE baseline recorded."""
    from steercmp_plugins.nla.ar import ActivationReconstructor
    from steercmp_plugins.nla.av import ActivationVerbalizer

    def explain(self, vectors, **kwargs):
        return [("the line ends with stream , planning dream or seem", "raw", True)] * len(vectors)

    monkeypatch.setattr(ActivationVerbalizer, "explain", explain)
    exp = RunSettings(layer=2, seed=0, model_id="tiny")
    m = NlaTextEdit({"av": str(pair_dir[0]), "ar": str(pair_dir[1]), "n_explanations": 2}, exp)
    rt = fake_runtime()
    props = m.propose(_contexts(orig=("dream", "seem")), rt)
    ar = ActivationReconstructor.load(str(pair_dir[1]))
    original, edited = ar.reconstruct(["the line ends with stream , planning dream or seem",
                                       "the line ends with stream , planning gleam or beam"])
    for p in props:
        assert p.status == "editable" and p.meta["fve_baseline"] > 0
        if p.family in ("edited", "unrelated"):
            assert p.meta["edit_mode"] == "replaced" and p.meta["replacements"] == 2
    target = next(p for p in props if p.family == "edited")
    assert torch.allclose(target.delta, (edited - original).float(), atol=1e-5)
    unrelated = next(p for p in props if p.family == "unrelated")
    assert "stone or bone" in unrelated.meta["edited_text"] and not torch.equal(unrelated.delta, target.delta)
    # the paraphrase rewords the framing, keeps the plan words, and goes through the same AR
    para = next(p for p in props if p.family == "paraphrase")
    reworded = "the last word of the line is stream , aiming for dream or seem"
    assert para.meta["paraphrase_text"] == reworded and para.status == "editable"
    assert torch.allclose(para.delta, (ar.reconstruct([reworded])[0] - original).float(), atol=1e-5)
    # the round trip: h + delta is AR(original) rescaled to ||h||, applied once at alpha 1
    ctx = _contexts(orig=("dream", "seem"))[0]
    rt_prop = next(p for p in props if p.family == "round_trip" and p.prompt_id == ctx.prompt.id)
    h = ctx.activation
    assert rt_prop.fixed_alpha == 1.0
    assert torch.allclose(h + rt_prop.delta, original / original.norm() * h.norm(), atol=1e-4)


def test_fidelity_gate_moves_prompts_apart(pair_dir, monkeypatch):
    """Below the gate a prompt keeps its deltas but leaves the primary analysis (below_fidelity);
    a gate above 1 is refused before anything loads."""
    from steercmp_plugins.nla.av import ActivationVerbalizer

    monkeypatch.setattr(ActivationVerbalizer, "explain",
                        lambda self, vectors, **kw: [("planning dream or seem", "raw", True)] * len(vectors))
    exp = RunSettings(layer=2, seed=0, model_id="tiny")
    opts = {"av": str(pair_dir[0]), "ar": str(pair_dir[1]), "n_explanations": 1}
    open_gate = NlaTextEdit({**opts, "fidelity_gate": -1e9}, exp).propose(_contexts(orig=("dream", "seem")),
                                                                          fake_runtime())
    assert {p.status for p in open_gate} == {"editable"}
    shut = NlaTextEdit({**opts, "fidelity_gate": 1.0}, exp).propose(_contexts(orig=("dream", "seem")),
                                                                    fake_runtime())
    assert {p.status for p in shut} == {"below_fidelity"} and all(p.delta is not None for p in shut)
    assert all(p.meta["fidelity_gate"] == 1.0 for p in shut)
    with pytest.raises(ConfigError, match="fidelity_gate 1.5 is above 1"):
        NlaTextEdit({**opts, "fidelity_gate": 1.5}, exp).validate()
    with pytest.raises(ConfigError, match="leaves the text unchanged"):
        NlaTextEdit({**opts, "paraphrase_rules": {"planning": "Planning"}}, exp).validate()


def test_propose_checks_layer(pair_dir, tmp_path):
    exp = RunSettings(layer=7, seed=0)
    m = NlaTextEdit({"av": str(pair_dir[0]), "ar": str(pair_dir[1]), "n_explanations": 1,
                     "max_new_tokens": 2}, exp)
    with pytest.raises(ConfigError, match="layer"):
        m.propose(_contexts(1), fake_runtime())


def test_bad_options():
    with pytest.raises(ConfigError, match="selection"):
        NlaTextEdit({"av": "mini", "ar": "mini", "selection": "loose"}, None).validate()
    with pytest.raises(ConfigError, match="ar"):
        NlaTextEdit({"av": "mini"}, None).validate()


def test_cli_explain_and_reconstruct(pair_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    out = tmp_path / "v.safetensors"
    args = parser.parse_args(["reconstruct", "--ar", str(pair_dir[1]), "--text", "the stream",
                              "--out", str(out)])
    assert cli.handler(args) == 0
    vec = load_file(str(out))["vector"]
    assert vec.shape == (64,)
    args = parser.parse_args(["explain", "--av", str(pair_dir[0]), "--vector", str(out), "--n", "2",
                              "--max-new-tokens", "4", "--json", "--ar", str(pair_dir[1])])
    capsys.readouterr()
    assert cli.handler(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["explanations"]) == 2 and "mse_nrm" in data["explanations"][0]
    bad = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(64)}, str(bad))
    with pytest.raises(ConfigError, match="vector"):
        cli.handler(parser.parse_args(["explain", "--av", str(pair_dir[0]), "--vector", str(bad)]))


def test_plugin_registers():
    import steercmp_plugins.nla as nla
    from steercmp.plugin_manager import build_plugin_manager

    ps = build_plugin_manager(builtins=(), entry_points=False, extra=[nla])
    assert ps.method("nla_text_edit") is NlaTextEdit
    assert [c[0] for c in ps.commands()] == ["nla"]


def test_stale_or_missing_mini_quality_file_means_rebuild(tmp_path):
    """A cached mini pair counts as built only with a quality file of this version that carries
    the measured targets; a missing, unreadable or older one is rebuilt, never silently used."""
    from steercmp_plugins.nla import mini

    root = tmp_path / "pair"
    for f in ("av/nla_meta.yaml", "ar/nla_meta.yaml", "ar/value_head.safetensors"):
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text("x")
    assert not mini.is_built(root, "last")  # no quality file
    (root / "quality.json").write_text("{not json")
    assert not mini.is_built(root, "last")
    (root / "quality.json").write_text(json.dumps({"mini_version": "gemma-3-270m-L12-last-mini-v1",
                                                   "targets": {}}))
    assert not mini.is_built(root, "last")  # an older version
    (root / "quality.json").write_text(json.dumps({"mini_version": mini.mini_name("last"), "targets": {}}))
    assert mini.is_built(root, "last") and not mini.is_built(root, "first_line_break")


def test_cue_edit_states_the_positive_controls_counterfactual():
    """With the oracle-assisted ``cue_edit`` on, a rhyme-change prompt with cue words also swaps
    line 1's last word for the cue (and its spelled ending), the counterfactual the positive
    control patches in; by default the edit uses the battery's edit map only."""
    from steercmp_plugins.nla.editing import apply_edit
    from steercmp_plugins.nla.text_edit import edit_map_for

    p = Prompt(id="bat", text="The children laughed and pointed at the bat,\nAnd every night I dreamed about the",
               families={"original": ("hat", "cat"), "edited": ("bell", "well"), "unrelated": ("ship", "trip")},
               edits={"edited": {"hat": "bell", "cat": "well"}, "unrelated": {"hat": "ship", "cat": "trip"}},
               meta={"cue": {"edited": "shell", "unrelated": "lip"}})
    assert edit_map_for(p, "edited") == {"hat": "bell", "cat": "well"}  # no oracle by default
    assert edit_map_for(p, "edited", cue=True) == {"hat": "bell", "cat": "well", "bat": "shell", "-at": "-ell"}
    text = "The line ends with bat, rhyme -at. The next word is likely bat, hat or night."
    assert apply_edit(text, edit_map_for(p, "edited", cue=True))[0] == (
        "The line ends with shell, rhyme -ell. The next word is likely shell, bell or night.")
    assert apply_edit(text, edit_map_for(p, "unrelated", cue=True))[0].startswith("The line ends with lip, rhyme -ip.")
    plain = Prompt(id="p", text=p.text, families=p.families, edits=p.edits)  # no cue: the battery's map only
    assert edit_map_for(plain, "edited", cue=True) == {"hat": "bell", "cat": "well"}


def test_grounded_explanation_names_what_the_model_can_know():
    from steercmp_plugins.nla.mini.data import content_words, explanation_for

    text = "Upon the bank I sat beside the stream,\nAnd closed my eyes and drifted in a"
    assert content_words(text) == ["bank", "sat"]
    assert explanation_for("stream", ["dream", "team", "stream"], ["bank", "sat"]) == (
        "The line ends with stream, rhyme -eam. The next word is likely dream, team or stream. "
        "The line is about bank and sat.")
