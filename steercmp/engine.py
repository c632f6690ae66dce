"""Batched extraction and scoring on top of the shared injection and scoring modules.

``extract`` captures the residual stream once per prompt. ``score_rows`` is the reference
scorer: a full forward of every (row, branch) with per-row deltas and logits only for the
scoring slot and branch steps. :mod:`steercmp.sweep` computes the same numbers faster by
recomputing only what an injection can change; tests hold the two to 1e-4.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import torch

from steercmp.api import Prompt, PromptContext
from steercmp.injection import Injection, capturing, injecting, pad_batch
from steercmp.models import LoadedModel
from steercmp.positions import find_position
from steercmp.scoring import FormPlan, branch_sequences, logmass_from_logits


def chat_prefix(lm: LoadedModel, chat_template: bool) -> str:
    """The text before the couplet: nothing for base models; for instruction models one user
    turn asking for the couplet, then the model's turn, which the couplet text continues."""
    if not chat_template:
        return ""
    tok = lm.tokenizer
    if not getattr(tok, "chat_template", None):
        from steercmp.errors import ConfigError

        raise ConfigError("model.chat_template is on but the tokenizer has no chat template",
                          where="model.chat_template", fix="set chat_template: false for base models")
    return tok.apply_chat_template(
        [{"role": "user", "content": CHAT_INSTRUCTION}], tokenize=False, add_generation_prompt=True)


CHAT_INSTRUCTION = "Write a rhyming couplet."


def tokenize_prompt(lm: LoadedModel, prompt: Prompt, chat_template: bool = False,
                    text: str | None = None) -> tuple[tuple[int, ...], int, int]:
    """Token ids, injection position and scoring position for a prompt (or an override text).

    The chat-templated form already holds BOS, so it is tokenized without special tokens
    (a second BOS would shift every position).
    """
    body = text if text is not None else prompt.text
    prefix = chat_prefix(lm, chat_template)
    add_special = not chat_template
    ids = tuple(lm.tokenizer(prefix + body, add_special_tokens=add_special)["input_ids"])
    kw = {"prefix": prefix, "add_special_tokens": add_special}
    inject = find_position(lm.tokenizer, ids, body, prompt.inject, **kw)
    score = find_position(lm.tokenizer, ids, body, prompt.score, **kw)
    return ids, inject, score


@torch.no_grad()
def extract(lm: LoadedModel, layer: int, prompts: Sequence[Prompt], *, chat_template: bool = False,
            batch_size: int = 8, progress: Any = None) -> list[PromptContext]:
    """Capture the residual stream at the output of block ``layer`` for every prompt."""
    tokenized = [tokenize_prompt(lm, p, chat_template) for p in prompts]
    resids = capture_residuals(lm, layer, [t[0] for t in tokenized], batch_size=batch_size,
                               progress=progress)
    return [PromptContext(prompt=p, input_ids=ids, inject_pos=inj, score_pos=score, layer=layer,
                          resid=resid)
            for p, (ids, inj, score), resid in zip(prompts, tokenized, resids, strict=True)]


@torch.no_grad()
def capture_residuals(lm: LoadedModel, layer: int, sequences: Sequence[Sequence[int]], *,
                      batch_size: int = 8, progress: Any = None) -> list[torch.Tensor]:
    """The output of block ``layer`` for each token sequence, float32 on CPU, ``[len, d_model]``.

    Sequences are right-padded in batches (causal attention: padding never reaches real tokens).
    Plugins that need activations of their own texts (e.g. contrastive methods) use this too.
    """
    out: list[torch.Tensor] = []
    pad = lm.tokenizer.pad_token_id or 0
    starts = range(0, len(sequences), batch_size)
    if progress is not None:
        starts = progress(starts, "extract activations", len(starts))
    for start in starts:
        chunk = sequences[start:start + batch_size]
        ids, mask, _ = pad_batch(chunk, pad, side="right")
        with capturing(lm.model, layer) as store:
            lm.model(input_ids=ids.to(lm.input_device), attention_mask=mask.to(lm.input_device),
                     logits_to_keep=1)
        resid = store[0].float().cpu()
        out.extend(resid[i, : len(seq)].clone() for i, seq in enumerate(chunk))
    return out


@attrs.frozen(eq=False)
class ScoreRow:
    """One scoring row: a context, a plan of family forms, and one injection."""

    input_ids: tuple[int, ...]
    score_pos: int
    plan: FormPlan
    delta: torch.Tensor
    alpha: float
    position: int
    scaling: str

    @property
    def context(self) -> tuple[int, ...]:
        return self.input_ids[: self.score_pos + 1]


def group_rows(rows: Sequence[ScoreRow]) -> dict[tuple[Any, ...], list[int]]:
    """Rows sharing a context and a form plan (same prompt text) score together."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault((r.context, id(r.plan)), []).append(i)
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
        plan = first.plan
        seqs = branch_sequences(first.context, plan)
        nb = len(seqs)
        ids, mask, _ = pad_batch(seqs, pad, side="right")
        ids = ids.repeat(len(idx), 1)
        mask = mask.repeat(len(idx), 1)
        inj = Injection.build([rows[i].delta for i in idx], [rows[i].alpha for i in idx],
                              [rows[i].position for i in idx], [rows[i].scaling for i in idx])
        inj = inj.repeat_interleave(nb)
        keep = plan.max_branch + 1
        with injecting(lm.model, layer, inj):
            logits = lm.model(input_ids=ids.to(lm.input_device),
                              attention_mask=mask.to(lm.input_device), logits_to_keep=keep).logits
        # with right padding the scoring slot sits at index len(context)-1 for every branch
        start = len(first.context) - 1
        full_len = ids.shape[1]
        offset = start - (full_len - keep)
        logits = logits[:, offset: offset + keep] if offset >= 0 else logits
        masses = logmass_from_logits(logits.float().cpu(), plan)
        for fam, vals in masses.items():
            result[fam][torch.as_tensor(list(idx))] = vals
    return result
