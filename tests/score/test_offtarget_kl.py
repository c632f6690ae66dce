"""The off-target KL in float32 against a float64 reference, from a KL of 1e-9 to tens of nats."""

import pytest
import torch

from steercmp.score.sweep import offtarget_distribution, offtarget_kl


def reference(unsteered: torch.Tensor, rows: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    """KL(p' || q') over the kept tokens, both renormalised, in float64, the textbook way."""
    keep = torch.ones(unsteered.shape[-1], dtype=torch.bool)
    keep[exclude] = False
    lp = torch.log_softmax(unsteered.double()[keep], -1)
    lq = torch.log_softmax(rows.double()[:, keep], -1)
    return (lp.exp() * (lp - lq)).sum(-1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_offtarget_kl_matches_float64_at_every_scale(dtype):
    g = torch.Generator().manual_seed(3)
    vocab = 20000
    unsteered = (torch.randn(vocab, generator=g) * 3).to(dtype)
    exclude = torch.tensor([7, 300, 4000])
    scales = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 3.0]
    rows = torch.stack([unsteered.float() + torch.randn(vocab, generator=g) * s for s in scales])
    rows[-1, 11] += 150.0  # one token pushed far up: the logsumexp branch (expm1 would overflow)
    rows[-2] += 7.0  # a shift of every logit changes no distribution: only the perturbation counts
    rows = rows.to(dtype)
    got = offtarget_kl(offtarget_distribution(unsteered, exclude), rows)
    want = reference(unsteered, rows, exclude)
    assert got.dtype == torch.float64
    assert float(want.min()) < 1e-7 and float(want.max()) > 10  # the test spans the scales
    assert torch.allclose(got, want, rtol=2e-3, atol=1e-12), (got, want)


def test_offtarget_kl_ignores_the_family_tokens_and_is_zero_unsteered():
    g = torch.Generator().manual_seed(4)
    unsteered = torch.randn(5000, generator=g) * 2
    exclude = torch.tensor([1, 2, 3])
    moved = unsteered.clone()
    moved[exclude] += torch.tensor([9.0, -4.0, 20.0])  # only the families move: no side effect
    got = offtarget_kl(offtarget_distribution(unsteered, exclude), torch.stack([unsteered, moved]))
    assert float(got.max()) < 1e-6
