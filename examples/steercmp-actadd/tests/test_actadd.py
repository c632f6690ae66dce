"""The example plugin's own tests: the conformance kit, plus what is particular to ActAdd."""

import pytest
import torch
from steercmp_actadd import ActAdd

import steercmp.testing
from steercmp.api import ConfigError


def test_conformance():
    steercmp.testing.check_method(ActAdd)


def test_conformance_rescaled():
    report = steercmp.testing.check_method(ActAdd, options={"norm_fraction": 0.5, "template": "a {word}"})
    for p in report.proposals:
        h = next(c for c in report.contexts if c.prompt.id == p.prompt_id).activation
        assert float(p.delta.norm()) == pytest.approx(0.5 * float(h.norm()), rel=1e-4)


def test_delta_is_the_difference_of_the_prompt_pair():
    """The edited delta is exactly the mean difference of the captured last-token activations."""
    report = steercmp.testing.check_method(ActAdd)
    ctx, rt = report.contexts[0], report.runtime
    fams = ctx.prompt.families
    pairs = list(zip(fams["edited"], fams["original"], strict=False))
    acts = rt.capture([w for p in pairs for w in p], [-1] * 2 * len(pairs))
    expected = torch.stack([acts[2 * i] - acts[2 * i + 1] for i in range(len(pairs))]).mean(0)
    assert torch.allclose(report.proposal(ctx.prompt.id, "edited").delta, expected, atol=1e-6)


@pytest.mark.parametrize("options", [{"template": "no placeholder"}, {"norm_fraction": -1}, {"typo": 1}])
def test_bad_options(options):
    with pytest.raises(ConfigError):
        ActAdd(options, None).validate()
