"""Capturing the residual stream: the battery's prompts, or any texts a method or builder needs.

"Layer K" is the OUTPUT of decoder block K (``hidden_states[K+1]``); every capture in steercmp
(extraction, methods' contrastive texts, the SAE corpus, the mini NLA pair's gold vectors) goes
through :func:`capture_residuals`, which stops the forward after block K.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from steercmp.api import Prompt, PromptContext
from steercmp.lm.compat import pad_cache_layers
from steercmp.lm.hooks import capturing_layers, layer_outputs
from steercmp.lm.layout import decoder_layers, text_config
from steercmp.lm.load import LoadedModel
from steercmp.lm.prompts import (
    TokenizedPrompt,
    pad_batch,
    resolve_rule,
    tokenize_prompt,
    tokenize_text,
)


@torch.no_grad()
def capture_residuals(lm: LoadedModel, layer: int, sequences: Sequence[Sequence[int]], *,
                      batch_size: int = 8, progress: Any = None) -> list[torch.Tensor]:
    """The output of block ``layer`` for each token sequence, float32 on CPU, ``[len, d_model]``.

    Sequences are right-padded in batches (causal attention: padding never reaches real tokens).
    """
    out: list[torch.Tensor] = []
    pad = lm.tokenizer.pad_token_id or 0
    starts = range(0, len(sequences), batch_size)
    if progress is not None:
        starts = progress(starts, "extract activations", len(starts))
    for start in starts:
        chunk = sequences[start:start + batch_size]
        ids, mask, _ = pad_batch(chunk, pad, side="right")
        resid = layer_outputs(lm.model, layer, ids.to(lm.input_device),
                              attention_mask=mask.to(lm.input_device)).float().cpu()
        out.extend(resid[i, : len(seq)].clone() for i, seq in enumerate(chunk))
    return out


#: sequences share one forward of their common prefix when it is at least this many tokens
MIN_SHARED_PREFIX = 4


def prefix_groups(sequences: Sequence[Sequence[int]], min_prefix: int = MIN_SHARED_PREFIX
                  ) -> list[tuple[int, list[int]]]:
    """``(prefix length, member indices)`` groups of sequences that share their first ``prefix
    length`` tokens (at least ``min_prefix``; every member keeps at least one token of its own),
    greedily over the sorted sequences; the sequences that share nothing form one group of
    prefix length 0."""
    order = sorted(range(len(sequences)), key=lambda i: tuple(sequences[i]))
    groups: list[tuple[int, list[int]]] = []
    alone: list[int] = []

    def close(plen: int, members: list[int]) -> None:
        if len(members) > 1:
            groups.append((plen, members))
        else:
            alone.extend(members)

    plen, members = 0, []
    for i in order:
        seq = sequences[i]
        if members:
            first = sequences[members[0]]
            k = 0
            limit = min(plen, len(seq) - 1)
            while k < limit and first[k] == seq[k]:
                k += 1
            if k >= min_prefix:
                plen, members = k, [*members, i]
                continue
            close(plen, members)
        plen, members = len(seq) - 1, [i]
    if members:
        close(plen, members)
    if alone:
        groups.append((0, sorted(alone)))
    return groups


@torch.no_grad()
def capture_last_tokens(lm: LoadedModel, layer: int, sequences: Sequence[Sequence[int]], *,
                        batch_size: int = 8) -> list[torch.Tensor]:
    """The output of block ``layer`` at the LAST token of each sequence, float32 on CPU,
    ``[d_model]``. Sequences that share a prefix (a template with one word swapped, as in
    contrastive texts) run it once: its keys and values are computed once and each member runs
    only its own tail on top of them (diffmean's 3200 texts share 43% of their tokens). The
    values are :func:`capture_residuals`' up to the dtype's rounding."""
    from transformers import DynamicCache

    model, device = lm.model, lm.input_device
    pad = lm.tokenizer.pad_token_id or 0
    out: list[torch.Tensor] = [torch.empty(0)] * len(sequences)
    for plen, members in prefix_groups(sequences):
        if plen == 0:
            found = capture_residuals(lm, layer, [sequences[i] for i in members], batch_size=batch_size)
            for i, resid in zip(members, found, strict=True):
                out[i] = resid[-1].clone()
            continue
        prefix = torch.as_tensor([list(sequences[members[0]][:plen])], device=device)
        cache = DynamicCache(config=text_config(model.config))
        h = layer_outputs(model, layer, prefix, cache)
        # the blocks after ``layer`` never ran: give them entries so masks see the true length
        pad_cache_layers(cache, range(layer + 1, len(decoder_layers(model))), plen, h, model.config)
        for s in range(0, len(members), batch_size):
            chunk = members[s:s + batch_size]
            tails = [list(sequences[i][plen:]) for i in chunk]
            ids, _, _ = pad_batch(tails, pad, side="right")  # causal: padding after a row is never read
            rows = copy.deepcopy(cache)
            rows.batch_repeat_interleave(len(chunk))
            resid = layer_outputs(model, layer, ids.to(device), rows)
            for row, i in enumerate(chunk):
                out[i] = resid[row, len(tails[row]) - 1].float().cpu().clone()
    return out


@torch.no_grad()
def capture_tokens(lm: LoadedModel, layer: int, tokens: torch.Tensor) -> torch.Tensor:
    """The output of block ``layer`` for a ``[rows, ctx]`` batch of unpadded token ids (packed
    training text), in the model's dtype on its device: ``[rows, ctx, d_model]``."""
    return layer_outputs(lm.model, layer, tokens.to(lm.input_device))


def capture_embeds(model: torch.nn.Module, layer: int, inputs_embeds: torch.Tensor) -> torch.Tensor:
    """The output of block ``layer`` for input embeddings (a builder's injected prompts);
    gradients are not tracked by the caller's choice (wrap in ``torch.no_grad()``)."""
    return layer_outputs(model, layer, inputs_embeds=inputs_embeds)


@torch.no_grad()
def capture_layers(lm: LoadedModel, sequences: Sequence[Sequence[int]], layers: Sequence[int], *,
                   batch_size: int = 8) -> list[torch.Tensor]:
    """The outputs of several blocks in one pass per batch: ``[len(layers), len, d_model]``
    float32 on CPU for each sequence (the last block needed ends the forward)."""
    out: list[torch.Tensor] = []
    pad = lm.tokenizer.pad_token_id or 0
    last = max(layers)
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        ids, mask, _ = pad_batch(chunk, pad, side="right")
        with capturing_layers(lm.model, list(layers)) as stores:
            layer_outputs(lm.model, last, ids.to(lm.input_device), attention_mask=mask.to(lm.input_device))
        stacked = torch.stack([stores[layer][0].float().cpu() for layer in layers])  # [L, B, S, d]
        out.extend(stacked[:, i, : len(seq)].clone() for i, seq in enumerate(chunk))
    return out


@torch.no_grad()
def extract(lm: LoadedModel, layer: int, prompts: Sequence[Prompt], *, chat_template: bool = False,
            batch_size: int = 8, progress: Any = None,
            tokens: Mapping[str, TokenizedPrompt] | None = None) -> list[PromptContext]:
    """One :class:`PromptContext` per battery prompt: its tokens, positions and residual stream.
    ``tokens`` (prompt id -> :class:`TokenizedPrompt`, from the preflight) saves tokenizing the
    prompts again."""
    tokenized = [tokens[p.id] if tokens is not None else tokenize_prompt(lm.tokenizer, p, chat_template)
                 for p in prompts]
    resids = capture_residuals(lm, layer, [t.ids for t in tokenized], batch_size=batch_size,
                               progress=progress)
    return [PromptContext(prompt=p, input_ids=t.ids, inject_pos=t.inject_pos, score_pos=t.score_pos,
                          layer=layer, resid=resid)
            for p, t, resid in zip(prompts, tokenized, resids, strict=True)]


@torch.no_grad()
def capture_at(lm: LoadedModel, layer: int, inputs: Sequence[str | Sequence[int]],
               positions: Sequence[int | str] | None = None, *, chat_template: bool = False,
               batch_size: int = 8) -> list[torch.Tensor]:
    """Residuals of texts or token-id sequences (what :meth:`steercmp.api.MethodRuntime.capture`
    serves). A text is tokenized like a battery prompt (chat prefix if the experiment has one,
    BOS). ``positions`` (one per input) is an absolute index (negative from the end) or a
    position rule such as ``first_line_break``; with it each result is ``[d_model]`` and the
    forward stops at that token, without it each result is ``[len, d_model]``."""
    if positions is not None and len(positions) != len(inputs):
        raise ValueError(f"capture got {len(inputs)} inputs but {len(positions)} positions")
    seqs: list[tuple[int, ...]] = []
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            ids, prefix = tokenize_text(lm.tokenizer, item, chat_template)
        else:
            ids, prefix = tuple(int(t) for t in item), ""
        pos: int | None = None
        if positions is not None:
            rule = positions[i]
            if isinstance(rule, str):
                if not isinstance(item, str):
                    raise ValueError("a position rule needs a text input, not token ids")
                pos = resolve_rule(lm.tokenizer, ids, item, rule, prefix=prefix, chat_template=chat_template)
            else:
                pos = int(rule) if int(rule) >= 0 else len(ids) + int(rule)
                if not 0 <= pos < len(ids):
                    raise ValueError(f"position {rule} is outside input {i} ({len(ids)} tokens)")
            ids = ids[: pos + 1]  # causal: later tokens cannot change this position
        seqs.append(ids)
    if positions is not None:  # each sequence ends at its position: only its last token is read
        return capture_last_tokens(lm, layer, seqs, batch_size=batch_size)
    return capture_residuals(lm, layer, seqs, batch_size=batch_size)


__all__ = ["capture_at", "capture_embeds", "capture_last_tokens", "capture_layers", "capture_residuals", "capture_tokens",
           "extract", "prefix_groups"]
