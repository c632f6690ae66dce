"""The fast scoring sweep: recompute only what an injection can change.

A delta added at the output of block L at position p cannot change
- any position before p (at any layer): their keys/values are computed once per context and
  reused from a KV cache;
- blocks 0..L at any position (the delta enters after them): their output is computed once per
  context (and per scoring branch) and reused for every row.
So each row runs blocks L+1..N-1 over positions p..end only, and logits are computed only at
the scoring slot (and the branch steps of multi-token forms).

The partial pass goes through the model's OWN forward (its masks, rotary embeddings and cache
handling) with blocks 0..L temporarily swapped for identity modules and the stored layer-L output
fed as ``inputs_embeds``; :func:`steercmp.engine.score_rows` is the plain reference it must match.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from steercmp.engine import ScoreRow, group_rows
from steercmp.injection import Injection, apply_injection, capturing, pad_batch
from steercmp.models import LoadedModel, decoder_layers
from steercmp.scoring import branch_sequences, logmass_from_logits


class _SkipBlock(torch.nn.Module):
    """Stands in for a block whose output is already known: passes the residual through."""

    def __init__(self, original: torch.nn.Module):
        super().__init__()
        self.attention_type = getattr(original, "attention_type", None)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


@contextmanager
def skipping_blocks(model: torch.nn.Module, upto: int) -> Iterator[None]:
    """Replace blocks 0..upto with identities for the duration; always restore them."""
    layers = decoder_layers(model)
    saved = [layers[i] for i in range(upto + 1)]
    try:
        for i in range(upto + 1):
            layers[i] = _SkipBlock(saved[i])
        yield
    finally:
        for i, block in enumerate(saved):
            layers[i] = block


def auto_batch_size(lm: LoadedModel, seq_len: int, n_branches: int, keep: int) -> int:
    """Rows per batch from available memory: the logits (keep x vocab per sequence) dominate."""
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    d = lm.d_model
    per_row = n_branches * (keep * vocab * 4 * 3 + seq_len * d * 4 * 24)
    if torch.cuda.is_available() and lm.input_device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(lm.input_device)
        budget = free * 0.5
    else:
        try:
            import os

            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            avail = 4 * 2**30
        budget = min(avail * 0.25, 2 * 2**30)  # beyond ~2 GiB a CPU batch gains nothing
    return max(1, min(512, int(budget // max(per_row, 1))))


@torch.no_grad()
def score_rows_fast(lm: LoadedModel, layer: int, rows: Sequence[ScoreRow], *,
                    batch_size: int | str = "auto", progress: Any = None) -> dict[str, torch.Tensor]:
    """Same result as :func:`steercmp.engine.score_rows`, recomputing only blocks L+1..N after p."""
    result = {f: torch.full((len(rows),), float("nan")) for f in ("original", "edited", "unrelated")}
    model = lm.model
    device = lm.input_device
    pad = lm.tokenizer.pad_token_id or 0
    groups = list(group_rows(rows).values())
    if progress is not None:
        groups = progress(groups, "score cells", len(groups))
    for idx in groups:
        first = rows[idx[0]]
        plan = first.plan
        context = first.context
        seqs = branch_sequences(context, plan)
        nb = len(seqs)
        keep = plan.max_branch + 1
        p_min = min(rows[i].position for i in idx)
        # 1) once per context: layer-L output for every branch sequence, and the prefix KV cache
        ids, _mask, _ = pad_batch(seqs, pad, side="right")
        with capturing(model, layer) as store:
            model(input_ids=ids.to(device), logits_to_keep=1, use_cache=False)
        h_layer = store[0][:, p_min:]  # [nb, S - p_min, d]
        prefix_cache = None
        if p_min > 0:
            out = model(input_ids=torch.as_tensor([context[:p_min]], device=device), use_cache=True,
                        logits_to_keep=1)
            prefix_cache = out.past_key_values
        # 2) per chunk of rows: blocks L+1..N on positions p_min.. with per-row deltas
        size = batch_size if isinstance(batch_size, int) else auto_batch_size(lm, ids.shape[1] - p_min, nb, keep)
        start_slot = len(context) - 1 - p_min  # index of the scoring slot in the suffix
        for s in range(0, len(idx), size):
            chunk = idx[s:s + size]
            inj = Injection.build([rows[i].delta for i in chunk], [rows[i].alpha for i in chunk],
                                  [rows[i].position for i in chunk], [rows[i].scaling for i in chunk])
            inj = inj.repeat_interleave(nb)
            hidden = h_layer.repeat(len(chunk), 1, 1)
            hidden = apply_injection(hidden, inj, offset=p_min)
            cache = None
            if prefix_cache is not None:
                cache = copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(hidden.shape[0])
            with skipping_blocks(model, layer):
                logits = model(inputs_embeds=hidden, past_key_values=cache, use_cache=cache is not None,
                               logits_to_keep=hidden.shape[1] - start_slot).logits
            logits = logits[:, :keep]
            masses = logmass_from_logits(logits.float().cpu(), plan)
            sel = torch.as_tensor(list(chunk))
            for fam, vals in masses.items():
                result[fam][sel] = vals
    return result
