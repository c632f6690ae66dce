"""The dataset-level FVE baseline: how much normalised activations vary at the NLA's layer and
position type, estimated from many generated couplets rather than from the few battery prompts.

``fve_nrm = 1 - mse_nrm / B`` is comparable with the paper's ~0.75 only when ``B`` is a
dataset-level variance: with 8 battery vectors it is noisy, and with one prompt (a shard) it is
undefined. :data:`N_COUPLETS` couplets generated from the CMU dictionary (a fixed seed, so ``B``
is a property of the model, layer and position, not of the run) are read at the NLA's position
(the first line break unless the experiment injects elsewhere).
"""

from __future__ import annotations

from typing import Any

import torch

from steercmp.api import MethodRuntime, make_couplets

from .fidelity import baseline_variance

N_COUPLETS = 256
CORPUS_SEED = 0
POSITION = "first_line_break"


def dataset_baseline(runtime: MethodRuntime, model_id: str, *, n: int = N_COUPLETS,
                     position: str = POSITION) -> dict[str, Any]:
    """``{"value": B, "n": n, "position": ...}`` for the base model at the runtime's layer,
    computed once per run and cached in the run directory, shared by every configured variant of
    the NLA method (it depends on the base model alone)."""
    couplets = make_couplets(n, CORPUS_SEED)
    key = {"model": model_id, "dtype": str(runtime.dtype), "layer": runtime.layer, "n": len(couplets),
           "seed": CORPUS_SEED, "position": position, "version": 1}

    def compute() -> dict[str, Any]:
        acts = runtime.capture([c.text for c in couplets], [position] * len(couplets))
        return {"value": baseline_variance(torch.stack(acts)), "n": len(couplets), "position": position,
                "source": "generated couplets (steercmp.rhymes.make_couplets)"}

    return runtime.cached("fve_baseline", key, compute, shared=True)
