"""The benchmark's grid: prompts x conditions x alphas, with the deltas every path injects
(see :mod:`steercmp.bench`), and the deterministic subsample the slow paths time."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from steercmp.hashing import make_generator
from steercmp.lm.capture import extract
from steercmp.lm.load import LoadedModel
from steercmp.lm.readout import readout_directions
from steercmp.score.forms import family_forms
from steercmp.score.full_forward import ScoreRow

CONDITIONS = ("target_edit", "unrelated_edit", "noop", "random_delta", "wrong_position")
ALPHAS = (-2.0, -1.0, 0.0, 1.0, 2.0, 4.0, 8.0)
FAMILIES = ("original", "edited", "unrelated")


def bench_cells(lm: LoadedModel, layer: int, prompts: Sequence[Any], *, seed: int = 0,
                alphas: Sequence[float] = ALPHAS, norm_fraction: float = 0.25
                ) -> tuple[list[dict[str, Any]], list[ScoreRow]]:
    """Cells (prompt x condition x alpha, grid order) and their score rows. A prompt whose families
    share their unembedding rows (a tiny test tokenizer's ``<unk>``) gets a zero direction."""
    contexts = extract(lm, layer, prompts)
    cells: list[dict[str, Any]] = []
    rows: list[ScoreRow] = []
    for ctx in contexts:
        fams = ctx.prompt.families
        forms = family_forms(lm.tokenizer, fams)
        orig = readout_directions(lm, fams["original"]).mean(0)
        h_norm = float(ctx.activation.norm())
        prop = {}
        for fam in ("edited", "unrelated"):
            direction = readout_directions(lm, fams[fam]).mean(0) - orig
            prop[fam] = direction / direction.norm().clamp_min(1e-12) * norm_fraction * h_norm
        g = make_generator(seed, "bench", ctx.prompt.id, "random_delta")
        rnd = torch.randn(ctx.d_model, generator=g)
        spec = {
            "target_edit": (prop["edited"], ctx.inject_pos),
            "unrelated_edit": (prop["unrelated"], ctx.inject_pos),
            "noop": (torch.zeros(ctx.d_model), ctx.inject_pos),
            "random_delta": (rnd / rnd.norm() * prop["edited"].norm(), ctx.inject_pos),  # same norm
            "wrong_position": (prop["edited"], ctx.inject_pos - 1),
        }
        for cond in CONDITIONS:
            delta, pos = spec[cond]
            for alpha in alphas:
                cells.append({"prompt_id": ctx.prompt.id, "condition": cond, "alpha": float(alpha)})
                rows.append(ScoreRow(ctx.input_ids, ctx.score_pos, forms, delta.float(), float(alpha), pos, "raw"))
    return cells, rows


def subsample(n: int, target: int | None, block: int) -> list[int]:
    """Every k-th index (k coprime with ``block``) so a subsample covers every condition/alpha."""
    if target is None or target >= n:
        return list(range(n))
    k = max(1, math.ceil(n / max(target, 1)))
    while block > 1 and math.gcd(k, block) != 1:
        k += 1
    return list(range(0, n, k))


# ----------------------------------------------------------------------------- paths
