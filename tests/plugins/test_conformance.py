"""Every built-in method and control passes the plugin conformance kit (steercmp.testing).

A new built-in must be added to CONFORMANCE_OPTIONS (checked here on the kit's tiny model) or to
COVERED_ELSEWHERE (with the test that covers it); test_every_builtin_is_covered fails otherwise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import steercmp.testing
from steercmp.api import Method, Proposal
from steercmp.hookspecs import hookimpl
from steercmp.plugin_manager import DEFAULT_PLUGINS, build_plugin_manager

HERE = Path(__file__).resolve().parent
BUILTINS = tuple(dict.fromkeys((*DEFAULT_PLUGINS, "steercmp_plugins.prompting")))


def _nla_pair(tmp_path: Path) -> dict:
    """A tiny random AV/AR pair matching the kit's model: d_model 64, layer 2."""
    from steercmp_plugins.nla.tiny_pair import write_pair

    av, ar = write_pair(tmp_path, layer=2, hidden=64)
    return {"av": str(av), "ar": str(ar), "n_explanations": 2, "max_new_tokens": 6, "selection": "default"}


def _tiny_sae(tmp_path: Path) -> dict:
    """A random sae-lens SAE on the kit model's layer 2 (d_in 64), saved in sae-lens disk format."""
    from steercmp_plugins.sae.tiny_sae import write_random_sae

    return {"path": str(write_random_sae(tmp_path)), "k": 3}


#: kit arguments beyond options, per method. The tiny NLA pair's random AV names none of the
#: battery's words, so every prompt is a ``fallback`` prompt (kept, with the ``default`` selection)
#: whose delta is exactly zero (nothing to edit): zero deltas are accepted, norm_relative is
#: skipped and the two families cannot differ. tests/plugins/nla covers the editable path.
KIT_ARGS = {
    "nla_text_edit": {"allow_zero": True, "scalings": ("raw",), "distinct_families": False},
}


#: method name -> options factory (tmp_path -> options) for the kit's tiny model
CONFORMANCE_OPTIONS = {
    "unembed_direction": lambda tmp: {"norm_fraction": 0.25},
    "prompting": lambda tmp: {},
    "diffmean": lambda tmp: {},
    "counterfactual_patch": lambda tmp: {},
    "counterfactual_text": lambda tmp: {},
    "nla_text_edit": _nla_pair,
    "sae_features": _tiny_sae,
}
#: built-in methods whose conformance is covered by their own suites (and why)
COVERED_ELSEWHERE: dict[str, str] = {}


def _builtin_set():
    return build_plugin_manager(builtins=BUILTINS, entry_points=False)


def test_every_builtin_is_covered():
    ps = _builtin_set()
    missing = sorted(set(ps.methods) - set(CONFORMANCE_OPTIONS) - set(COVERED_ELSEWHERE))
    assert not missing, f"add {missing} to CONFORMANCE_OPTIONS or COVERED_ELSEWHERE"


@pytest.mark.parametrize("name", sorted(CONFORMANCE_OPTIONS))
def test_builtin_method_conforms(name, tmp_path):
    ps = _builtin_set()
    if name not in ps.methods:
        pytest.skip(f"{name} is not registered by the built-ins yet")
    kit_args = KIT_ARGS.get(name, {})
    report = steercmp.testing.check_method(ps.method(name), options=CONFORMANCE_OPTIONS[name](tmp_path),
                                           **kit_args)
    assert report.checks[-1] == "engine"
    assert set(report.masses) == set(kit_args.get("scalings", ("raw", "norm_relative")))
    if name == "counterfactual_patch":  # a patch is one operation: injected once, at alpha 1, in every cell
        assert {p.fixed_alpha for p in report.proposals if p.delta is not None} == {1.0}


@pytest.mark.parametrize("name", ["noop", "random_delta", "wrong_position"])
def test_builtin_control_conforms(name):
    ps = _builtin_set()
    derived = steercmp.testing.check_control(ps.control(name))
    assert len(derived) == len(steercmp.testing.TINY_BATTERY["prompts"])


def test_prompting_instruction_form_conforms():
    from steercmp_plugins.prompting import Prompting

    report = steercmp.testing.check_method(Prompting, setup=steercmp.testing.KitSetup(chat_template=True))
    text = report.proposal("stream_dream", "edited").prompt_text
    assert text.startswith("Here is a couplet") and '"gleam"' in text
    assert report.proposal("stream_dream", "unrelated").prompt_text.count('"stone"') == 1


# ------------------------------------------------------------------ the kit catches bad plugins
class _Base(Method):
    description = "a deliberately broken method"

    def propose(self, contexts, runtime):
        return [Proposal(prompt_id=c.prompt.id, family=f, delta=self.delta(c, f, runtime))
                for c in contexts for f in ("edited", "unrelated")]

    def delta(self, ctx, family, runtime):
        g = runtime.generator(ctx.prompt.id, family)
        return torch.randn(ctx.d_model, generator=g)


def _plugin(cls):
    class Plugin:
        @hookimpl
        def register_methods(self, register):
            register(cls)

    return Plugin()


def _broken(name, **attrs):
    cls = type(f"Broken_{name}", (_Base,), {"name": name, **attrs})
    return cls, _plugin(cls)


def test_kit_accepts_a_good_method():
    cls, plugin = _broken("good_example")
    report = steercmp.testing.check_method(cls, plugin=plugin)
    assert "deterministic" in report.checks


@pytest.mark.parametrize("name, attrs, check", [
    ("wrong_shape", {"delta": lambda self, c, f, r: torch.ones(c.d_model + 1)}, "shape"),
    ("wrong_dtype", {"delta": lambda self, c, f, r: torch.ones(c.d_model, dtype=torch.float64)}, "dtype"),
    ("not_finite", {"delta": lambda self, c, f, r: torch.full((c.d_model,), float("nan"))}, "finite"),
    ("unseeded", {"delta": lambda self, c, f, r: torch.randn(c.d_model)}, "deterministic"),
    ("same_for_both", {"delta": lambda self, c, f, r: torch.ones(c.d_model)}, "families"),
    ("edited_only", {"propose": lambda self, cs, r: [
        Proposal(prompt_id=c.prompt.id, family="edited", delta=torch.ones(c.d_model)) for c in cs]},
     "families"),
    ("bad_resources", {"resources": lambda self: ["a model"]}, "resources"),
])
def test_kit_rejects(name, attrs, check):
    cls, plugin = _broken(name, **attrs)
    with pytest.raises(steercmp.testing.ConformanceError) as err:
        steercmp.testing.check_method(cls, plugin=plugin)
    assert err.value.check == check, str(err.value)


def test_kit_rejects_leftover_hooks():
    def delta(self, ctx, family, runtime):
        with runtime.base() as lm:
            lm.model.model.layers[0].register_forward_hook(lambda *a: None)
        return _Base.delta(self, ctx, family, runtime)

    cls, plugin = _broken("leaky", delta=delta)
    with pytest.raises(steercmp.testing.ConformanceError, match=r"\[hooks\]"):
        steercmp.testing.check_method(cls, plugin=plugin)


def test_kit_rejects_unregistered_and_taken_names():
    cls, _ = _broken("never_registered")
    with pytest.raises(steercmp.testing.ConformanceError, match=r"\[registers\]"):
        steercmp.testing.check_method(cls, plugin=_plugin(_broken("other")[0]))
    taken, plugin = _broken("unembed_direction")
    with pytest.raises(steercmp.testing.ConformanceError, match="already taken"):
        steercmp.testing.check_method(taken, plugin=plugin)


def test_runtime_cached_and_tables():
    lm = steercmp.testing.tiny_lm()
    rt = steercmp.testing.TestRuntime(lm, seed=3)
    calls = []
    assert rt.cached("x", {"k": 1}, lambda: calls.append(1) or [1, 2]) == [1, 2]
    assert rt.cached("x", {"k": 1}, lambda: calls.append(1) or [9]) == [1, 2]
    assert calls == [1]
    with pytest.raises(steercmp.testing.ConformanceError, match="JSON"):
        rt.cached("y", {}, lambda: torch.zeros(2))
    rt.write_table("t", [{"a": 1}])
    assert rt.tables["t"] == [{"a": 1}]
    g1, g2 = rt.generator("p"), steercmp.testing.TestRuntime(lm, seed=3).generator("p")
    assert torch.equal(torch.randn(3, generator=g1), torch.randn(3, generator=g2))


def test_kit_spells_some_words_with_several_tokens():
    """The kit's tokenizer is not one token per word: the KIT_SPLITS words take two tokens, so
    a token position is not a word position (the stream_dream injection site is past the
    multi-token 'wandered'), and families are scored as multi-token branches."""
    lm = steercmp.testing.tiny_lm()
    for word, pieces in steercmp.testing.KIT_SPLITS.items():
        ids = lm.tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        assert lm.tokenizer.convert_ids_to_tokens(ids) == ["▁" + pieces[0], *pieces[1:]]
    ctx = next(c for c in steercmp.testing.tiny_contexts(lm) if c.prompt.id == "stream_dream")
    line_one = ctx.prompt.text.split("\n")[0]
    assert ctx.inject_pos == len(line_one.replace(",", " ,").split()) + 2  # BOS + words + 'ed' of wandered
    assert lm.tokenizer.convert_ids_to_tokens(ctx.input_ids[ctx.inject_pos]) == "\n"
    assert len(steercmp.testing.tiny_lm(splits=None).tokenizer(" gleam", add_special_tokens=False)["input_ids"]) == 1
