"""The positive control is activation patching: delta = h_cf - h at the site, so alpha 1 puts the
counterfactual's residual there exactly; checked against HF's own hidden states."""

import torch

import steercmp.testing
from steercmp.couplets import same_rhyme, swap_line_end
from steercmp.lm.couplet_counterfactual import build_counterfactual
from steercmp.lm.prompts import tokenize_prompt
from steercmp_plugins.counterfactual import CounterfactualPatch, CounterfactualText


def test_patch_delta_is_the_counterfactual_residual_minus_the_original():
    report = steercmp.testing.check_method(CounterfactualPatch)
    lm, layer = report.runtime.lm, 2
    for ctx in report.contexts:
        for family in ("edited", "unrelated"):
            p = report.proposal(ctx.prompt.id, family)
            assert p.meta["role"] == "positive_control"
            if ctx.prompt.id == "lake_gleam":  # no same-length counterfactual: dropped (test_positive_control_drop)
                assert p.status == "dropped"
                continue
            cf = build_counterfactual(lm.tokenizer, ctx.prompt, family)
            assert p.meta["word"] == cf.word and p.meta["counterfactual"] == cf.text
            with torch.no_grad():
                hidden = lm.model(input_ids=torch.tensor([cf.tokens.ids]), output_hidden_states=True).hidden_states
            h_cf = hidden[layer + 1][0, ctx.inject_pos]
            assert torch.allclose(ctx.activation + p.delta, h_cf, atol=1e-4)


def test_constructions_follow_the_family_rhyme():
    lm = steercmp.testing.tiny_lm()
    prompt = steercmp.testing.tiny_battery().by_id()["stream_dream"]
    assert same_rhyme(prompt, "edited") and not same_rhyme(prompt, "unrelated")
    swap = build_counterfactual(lm.tokenizer, prompt, "edited")
    # the kit spells "gleam" with two tokens (KIT_SPLITS): the swap keeps the prompt's length with "beam"
    assert len(lm.tokenizer(" gleam", add_special_tokens=False)["input_ids"]) == 2
    assert swap.construction == "swap" and swap.word == "beam"
    assert swap.text == swap_line_end(prompt.text, "beam")
    block = build_counterfactual(lm.tokenizer, prompt, "edited", "block")
    assert block.word == "dream"
    cue = build_counterfactual(lm.tokenizer, prompt, "unrelated")
    assert cue.construction == "cue" and cue.word not in ("stone", "bone", "stream", "dream", "seem")
    orig = tokenize_prompt(lm.tokenizer, prompt)
    assert len(cue.tokens.ids) == len(orig.ids) and cue.first_diff == orig.inject_pos - 2


def test_ceiling_scores_the_counterfactual_text():
    report = steercmp.testing.check_method(CounterfactualText)
    p = report.proposal("stream_dream", "edited")
    assert p.meta["role"] == "ceiling" and p.prompt_text.startswith("I wandered slowly down beside the beam,")
