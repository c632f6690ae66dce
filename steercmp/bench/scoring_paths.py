"""The implementations the sweep is timed against: (a) a per-cell hook loop, (b) nnsight, and the
minimal-recomputation bound (see :mod:`steercmp.bench`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from steercmp.bench.grid import FAMILIES
from steercmp.lm.hooks import Injection, injecting
from steercmp.lm.load import LoadedModel
from steercmp.lm.prompts import pad_batch
from steercmp.lm.readout import project_to_vocab
from steercmp.score.forms import branch_sequences, logmass_from_logits
from steercmp.score.full_forward import ScoreRow, group_rows
from steercmp.score.sweep import (
    block_batch_size,
    branch_pass,
    prepare_context,
    readout_batch_rows,
    suffix_pass,
)


@torch.no_grad()
def loop_scores(lm: LoadedModel, layer: int, rows: Sequence[ScoreRow]) -> dict[str, torch.Tensor]:
    """(a) One full forward per cell (every position's logits) with a forward hook."""
    out = {f: torch.empty(len(rows)) for f in FAMILIES}
    pad = lm.tokenizer.pad_token_id or 0
    for i, r in enumerate(rows):
        seqs = branch_sequences(r.context, r.forms)
        ids, mask, _ = pad_batch(seqs, pad, side="right")
        inj = Injection.build(r.delta[None], [r.alpha], [r.position], r.scaling).repeat_interleave(len(seqs))
        with injecting(lm.model, layer, inj):
            logits = lm.model(input_ids=ids.to(lm.input_device), attention_mask=mask.to(lm.input_device)).logits
        start = len(r.context) - 1
        masses = logmass_from_logits(logits[:, start:start + r.forms.max_branch + 1].float().cpu(), r.forms)
        for f in FAMILIES:
            out[f][i] = masses[f][0]
    return out


@torch.no_grad()
def nnsight_scores(lm: LoadedModel, layer: int, rows: Sequence[ScoreRow], nn_model: Any = None
                   ) -> dict[str, torch.Tensor]:
    """(b) One nnsight trace per cell; the residual edit is written inside the trace (raw scaling)."""
    if nn_model is None:
        nn_model = wrap_nnsight(lm)
    out = {f: torch.empty(len(rows)) for f in FAMILIES}
    pad = lm.tokenizer.pad_token_id or 0
    blocks = _nnsight_blocks(nn_model)
    for i, r in enumerate(rows):
        if r.scaling != "raw":
            raise ValueError("the nnsight path implements raw scaling only")
        seqs = branch_sequences(r.context, r.forms)
        ids, mask, _ = pad_batch(seqs, pad, side="right")
        add = (r.alpha * r.delta).to(lm.input_device)
        with nn_model.trace({"input_ids": ids.to(lm.input_device), "attention_mask": mask.to(lm.input_device)}):
            hidden = blocks[layer].output
            if isinstance(hidden, tuple):
                hidden = hidden[0]
            hidden[:, r.position] += add.to(hidden.dtype)
            logits = nn_model.output.logits.save()
        start = len(r.context) - 1
        masses = logmass_from_logits(logits[:, start:start + r.forms.max_branch + 1].float().cpu(), r.forms)
        for f in FAMILIES:
            out[f][i] = masses[f][0]
    return out


def wrap_nnsight(lm: LoadedModel) -> Any:
    """nnsight's LanguageModel around a COPY of the model: nnsight replaces the forwards of the
    modules it wraps, which would otherwise slow every other path measured after it."""
    import copy
    import warnings

    from nnsight import LanguageModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LanguageModel(copy.deepcopy(lm.model), tokenizer=lm.tokenizer)


def _nnsight_blocks(nn_model: Any) -> Any:
    inner = nn_model.model
    return inner.layers if hasattr(inner, "layers") else inner.language_model.layers


@torch.no_grad()
def bound_times(lm: LoadedModel, layer: int, rows: Sequence[ScoreRow], batch_size: int | str = "auto"
                ) -> tuple[float, float]:
    """Seconds of (1) the bare pass of blocks L+1..N over the injected positions with the scoring
    slot's logits only, and (2) the same plus the branch-token pass and its logits, on the same
    rows, block batches and projection chunks as :func:`steercmp.score.sweep.score_rows_fast`
    (the once-per-context preparation and the log-masses and KLs are not timed)."""

    pad = lm.tokenizer.pad_token_id or 0
    per_call = readout_batch_rows(lm)
    bare = with_branches = 0.0
    for idx in group_rows(rows).values():
        first = rows[idx[0]]
        prep = prepare_context(lm, layer, first.context, first.forms, min(rows[i].position for i in idx), pad)
        size = batch_size if isinstance(batch_size, int) else block_batch_size(lm, prep, len(first.forms.branches))
        for s in range(0, len(idx), size):
            chunk = idx[s:s + size]
            inj = Injection.build([rows[i].delta for i in chunk], [rows[i].alpha for i in chunk],
                                  [rows[i].position for i in chunk], [rows[i].scaling for i in chunk])
            t = time.perf_counter()
            h0, _ = suffix_pass(lm.model, layer, prep, inj, project=False)
            _project(lm.model, h0, per_call)
            bare += time.perf_counter() - t
            t = time.perf_counter()
            h0, cache = suffix_pass(lm.model, layer, prep, inj, keep_cache=prep.n_branches > 0, project=False)
            if prep.n_branches:
                h_branch = branch_pass(lm.model, layer, prep, cache, len(chunk), project=False)
                h0 = torch.cat([h0, h_branch.reshape(-1, h_branch.shape[-1])])
            _project(lm.model, h0, per_call)
            with_branches += time.perf_counter() - t
    return bare, with_branches


def _project(model: torch.nn.Module, hidden: torch.Tensor, per_call: int) -> None:
    """The vocabulary projection of every row, in the sweep's chunk size (results dropped)."""
    for s in range(0, hidden.shape[0], per_call):
        project_to_vocab(model, hidden[s:s + per_call])


def max_abs_diff(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], index: Sequence[int]) -> float:
    idx = torch.as_tensor(list(index), dtype=torch.long)
    return max(float((got[f] - ref[f][idx]).abs().max()) for f in FAMILIES) if len(idx) else 0.0


# ----------------------------------------------------------------------------- completions
