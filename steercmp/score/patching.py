"""Activation patching through the shared engine: where does the rhyme plan live?

For a prompt and its counterfactual (:mod:`steercmp.lm.couplet_counterfactual`), patching site
(layer L, position p) replaces the original run's residual at the output of block L, position p,
by the counterfactual's: the shared injection engine adds ``delta = h_cf - h_orig`` there at
alpha 1 (raw), and the fast sweep scores it. The score is the target family's log-mass minus the
original family's at the rhyme slot; a site's *shift* is the patched score minus the unpatched
one, and the *ceiling* is the counterfactual text's own score minus the unpatched one (what an
intervention anywhere could move at most).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import torch

from steercmp.api import Prompt
from steercmp.lm.capture import capture_layers
from steercmp.lm.couplet_counterfactual import Counterfactual
from steercmp.lm.load import LoadedModel
from steercmp.lm.prompts import TokenizedPrompt
from steercmp.score.forms import FamilyForms, family_forms
from steercmp.score.full_forward import ScoreRow
from steercmp.score.sweep import score_rows_fast

OTHER = {"edited": "unrelated", "unrelated": "edited"}


def position_label(position: int, inject_pos: int, score_pos: int) -> str:
    """``slot`` for the scoring position, else the offset from the planning line break."""
    if position == score_pos:
        return "slot"
    offset = position - inject_pos
    return "line break" if offset == 0 else f"{offset:+d}"


def target_families(prompt: Prompt, family: str) -> dict[str, tuple[str, ...]]:
    """The families to score with ``family`` in the target ("edited") slot."""
    fams = prompt.families
    return {"original": tuple(fams["original"]), "edited": tuple(fams[family]), "unrelated": tuple(fams[OTHER[family]])}


@attrs.frozen(eq=False)
class PatchPlan:
    """What every layer's scan shares: the pairs, their captured layers, forms and reference scores."""

    pairs: Sequence[tuple[Prompt, TokenizedPrompt, Counterfactual]]
    layers: tuple[int, ...]
    captured: list[torch.Tensor]  # original runs, then counterfactual runs: [n_layers, len, d] each
    forms: list[FamilyForms]
    baseline: list[float]
    ceiling: list[float]


def prepare(lm: LoadedModel, layers: Sequence[int], pairs: Sequence[tuple[Prompt, TokenizedPrompt, Counterfactual]],
            *, batch_size: int | str = "auto") -> PatchPlan:
    """Capture every layer of both runs once and score the unpatched prompts and the counterfactuals."""
    layers = tuple(sorted(set(layers)))
    captured = capture_layers(lm, [t.ids for _p, t, _c in pairs] + [c.tokens.ids for _p, _t, c in pairs], layers)
    rows, forms = [], []
    zero = torch.zeros(lm.d_model)
    for prompt, tok, cf in pairs:
        f = family_forms(lm.tokenizer, target_families(prompt, cf.family))
        forms.append(f)
        rows.append(ScoreRow(tok.ids, tok.score_pos, f, zero, 0.0, tok.inject_pos, "raw"))
        rows.append(ScoreRow(cf.tokens.ids, cf.tokens.score_pos, f, zero, 0.0, cf.tokens.inject_pos, "raw"))
    ref = score_rows_fast(lm, layers[0], rows, batch_size=batch_size)
    scores = (ref["edited"] - ref["original"]).view(len(pairs), 2).tolist()
    return PatchPlan(pairs, layers, captured, forms, [s[0] for s in scores], [s[1] for s in scores])


def scan_layer(lm: LoadedModel, plan: PatchPlan, layer: int, *, batch_size: int | str = "auto",
               offsets: tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """Patch every position of one layer, from the counterfactual's first changed token to the
    slot (or the ``offsets`` range from the line break); one record per site."""
    li = plan.layers.index(layer)
    n = len(plan.pairs)
    rows, meta = [], []
    for i, (_prompt, tok, cf) in enumerate(plan.pairs):
        h_o, h_c = plan.captured[i][li], plan.captured[n + i][li]
        for pos in range(cf.first_diff, tok.score_pos + 1):
            if offsets is not None and not offsets[0] <= pos - tok.inject_pos <= offsets[1]:
                continue
            rows.append(ScoreRow(tok.ids, tok.score_pos, plan.forms[i], (h_c[pos] - h_o[pos]).float(), 1.0, pos, "raw"))
            meta.append((i, pos))
    if not rows:
        return []
    patched = score_rows_fast(lm, layer, rows, batch_size=batch_size)
    values = (patched["edited"] - patched["original"]).tolist()
    records = []
    for (i, pos), value in zip(meta, values, strict=True):
        prompt, tok, cf = plan.pairs[i]
        base = plan.baseline[i]
        records.append({
            "prompt_id": prompt.id, "family": cf.family, "construction": cf.construction, "word": cf.word,
            "layer": layer, "position": pos, "label": position_label(pos, tok.inject_pos, tok.score_pos),
            "offset": pos - tok.inject_pos, "baseline": base, "patched": float(value), "shift": float(value) - base,
            "ceiling": plan.ceiling[i] - base})
    return records


__all__ = ["OTHER", "PatchPlan", "position_label", "prepare", "scan_layer", "target_families"]
