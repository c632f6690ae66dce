"""Reconstruction fidelity: ``mse_nrm``, cosine and ``fve_nrm`` against a dataset baseline.

Both vectors are normalised to L2 norm ``sqrt(d)`` (the AR's ``mse_scale``), so
``mse_nrm = mean((p - g)^2) = 2 (1 - cos)`` lies in [0, 4]. ``fve_nrm = 1 - mse_nrm / B`` with
``B`` the per-element variance of the normalised gold vectors around their mean.
"""

from __future__ import annotations

import math

import attrs
import torch


def normalise(vectors: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Rescale each row to L2 norm ``scale`` (default ``sqrt(d)``), fp32."""
    v = vectors.float()
    scale = math.sqrt(v.shape[-1]) if scale is None else scale
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12) * scale


def baseline_variance(gold: torch.Tensor) -> float:
    """``B``: mean squared deviation of the normalised gold vectors from their mean."""
    g = normalise(gold if gold.ndim == 2 else gold[None])
    if g.shape[0] < 2:
        return float("nan")
    return float(((g - g.mean(dim=0, keepdim=True)) ** 2).mean())


@attrs.frozen
class Fidelity:
    mse_nrm: float
    cosine: float
    fve_nrm: float


def fidelity(pred: torch.Tensor, gold: torch.Tensor, baseline: float) -> Fidelity:
    """Scores of one reconstruction ``pred`` against its gold activation (both ``[d]``)."""
    p, g = normalise(pred[None])[0], normalise(gold[None])[0]
    mse = float(((p - g) ** 2).mean())
    cos = float(torch.nn.functional.cosine_similarity(pred.float(), gold.float(), dim=0))
    fve = 1.0 - mse / baseline if baseline and math.isfinite(baseline) and baseline > 0 else float("nan")
    return Fidelity(mse_nrm=mse, cosine=cos, fve_nrm=fve)
