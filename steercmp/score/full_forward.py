"""The scoring row and the reference scorer.

A :class:`ScoreRow` is one context, the family forms to score and one injection.
:func:`score_rows` is the plain reference: a full forward of every (row, branch) with per-row
deltas and logits only for the scoring slot and branch steps. :mod:`steercmp.score.sweep`
computes the same numbers faster by recomputing only what an injection can change; tests hold
the two to 1e-4.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import torch

from steercmp.lm.hooks import Injection, injecting
from steercmp.lm.load import LoadedModel
from steercmp.lm.prompts import pad_batch
from steercmp.score.forms import FamilyForms, branch_sequences, logmass_from_logits


@attrs.frozen(eq=False)
class ScoreRow:
    """One scoring row: a context, a forms of family forms, and one injection."""

    input_ids: tuple[int, ...]
    score_pos: int
    forms: FamilyForms
    delta: torch.Tensor
    alpha: float
    position: int
    scaling: str
    #: the context whose UNSTEERED next-token distribution the row's KL is measured against
    #: (``None``: its own context). A prompting row sets the original prompt's context, so its
    #: side effect counts the change of prompt, not zero by construction.
    kl_context: tuple[int, ...] | None = None

    @property
    def context(self) -> tuple[int, ...]:
        return self.input_ids[: self.score_pos + 1]


def group_rows(rows: Sequence[ScoreRow]) -> dict[tuple[Any, ...], list[int]]:
    """Rows sharing a context and a form forms (same prompt text) score together."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault((r.context, id(r.forms)), []).append(i)
    return groups


def chunks(indices: Sequence[int], size: int) -> Iterable[Sequence[int]]:
    for s in range(0, len(indices), size):
        yield indices[s:s + size]


@torch.no_grad()
def score_rows(lm: LoadedModel, layer: int, rows: Sequence[ScoreRow], *, batch_size: int = 32,
               progress: Any = None) -> dict[str, torch.Tensor]:
    """Reference scorer: full forward per (row, branch); returns ``{family: [len(rows)]}``."""
    result = {f: torch.full((len(rows),), float("nan")) for f in ("original", "edited", "unrelated")}
    groups = list(group_rows(rows).values())
    work = [(g, c) for g in groups for c in chunks(g, max(1, batch_size))]
    if progress is not None:
        work = progress(work, "score cells", len(work))
    pad = lm.tokenizer.pad_token_id or 0
    for _group, idx in work:
        first = rows[idx[0]]
        forms = first.forms
        seqs = branch_sequences(first.context, forms)
        nb = len(seqs)
        ids, mask, _ = pad_batch(seqs, pad, side="right")
        ids = ids.repeat(len(idx), 1)
        mask = mask.repeat(len(idx), 1)
        inj = Injection.build([rows[i].delta for i in idx], [rows[i].alpha for i in idx],
                              [rows[i].position for i in idx], [rows[i].scaling for i in idx])
        inj = inj.repeat_interleave(nb)
        keep = forms.max_branch + 1
        with injecting(lm.model, layer, inj):
            logits = lm.model(input_ids=ids.to(lm.input_device),
                              attention_mask=mask.to(lm.input_device), logits_to_keep=keep).logits
        # with right padding the scoring slot sits at index len(context)-1 for every branch
        start = len(first.context) - 1
        full_len = ids.shape[1]
        offset = start - (full_len - keep)
        logits = logits[:, offset: offset + keep] if offset >= 0 else logits
        masses = logmass_from_logits(logits.float().cpu(), forms)
        for fam, vals in masses.items():
            result[fam][torch.as_tensor(list(idx))] = vals
    return result
