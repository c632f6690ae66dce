"""The built-in diffmean method: the conformance kit, plus what is particular to diffmean."""

import pytest
import torch

import steercmp.testing
from steercmp.errors import ConfigError
from steercmp_plugins.diffmean import DiffMean, mean_difference, swap_line_end


def test_conformance():
    steercmp.testing.check_method(DiffMean)


def test_conformance_own_context_and_rescaled():
    report = steercmp.testing.check_method(DiffMean, options={"contexts": "own", "norm_fraction": 0.5})
    for p in report.proposals:
        h = report.contexts[[c.prompt.id for c in report.contexts].index(p.prompt_id)].activation
        assert float(p.delta.norm()) == pytest.approx(0.5 * float(h.norm()), rel=1e-4)


def test_swap_line_end():
    text = "I wandered down beside the stream,\nAnd closed my eyes to drift into a"
    assert swap_line_end(text, "gleam") == "I wandered down beside the gleam,\nAnd closed my eyes to drift into a"
    assert swap_line_end("no line break", "x") is None


def test_mean_difference():
    pos = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    neg = torch.tensor([[0.0, 1.0]])
    assert torch.equal(mean_difference(pos, neg), torch.tensor([2.0, 2.0]))


def test_delta_is_the_contrast_of_captured_activations():
    """With contexts: own, the edited delta is exactly mean(target lines) - mean(original lines)."""
    from steercmp.lm.capture import extract

    report = steercmp.testing.check_method(DiffMean, options={"contexts": "own"})
    ctx = report.contexts[0]
    lm = report.runtime.lm

    def act(word):
        prompt = ctx.prompt
        swapped = type(prompt)(**{**{f: getattr(prompt, f) for f in ("id", "families", "edits", "inject",
                                                                      "score", "rhyme", "meta")},
                                  "text": swap_line_end(prompt.text, word)})
        return extract(lm, ctx.layer, [swapped])[0].activation

    fams = ctx.prompt.families
    expected = (torch.stack([act(w) for w in fams["edited"]]).mean(0)
                - torch.stack([act(w) for w in fams["original"]]).mean(0))
    assert torch.allclose(report.proposal(ctx.prompt.id, "edited").delta, expected, atol=1e-5)


@pytest.mark.parametrize("options", [{"contexts": "mine"}, {"norm_fraction": -1}, {"typo": 1}])
def test_bad_options(options):
    with pytest.raises(ConfigError):
        DiffMean(options, None).validate()
