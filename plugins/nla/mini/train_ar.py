"""Training the mini AR by gradient: the truncated backbone's top blocks and the value head,
on the normalised MSE the release uses (both vectors at L2 norm sqrt(d)).

CPU-sized: the explanations' block inputs below the trained blocks are computed once and cached,
so an epoch runs only the top blocks. The value head starts from the closed-form ridge solution
on the frozen features (the v1 AR), so training can only improve on it in-sample; the held-out
curve (oracle explanations of prompts never seen in training) is recorded every epoch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import attrs
import torch

from steercmp.api import (
    LoadedModel,
    capture_residuals,
    last_block_at,
    progress_bar,
    top_blocks_only,
)

from ..fidelity import baseline_variance, normalise


@contextmanager
def raw_residual(model: torch.nn.Module):  # noqa: ANN201
    """The decoder's final norm off for the duration (the AR reads the raw residual after block K)."""
    decoder = model.get_decoder()
    norm = decoder.norm
    decoder.norm = torch.nn.Identity()
    try:
        yield
    finally:
        decoder.norm = norm


def _last_states(model: torch.nn.Module, start: int, cached: Sequence[torch.Tensor],
                 idx: Sequence[int]) -> torch.Tensor:
    """Run blocks ``start..K`` over the cached block inputs of ``idx`` (right-padded: causal rows
    never see their pads); the last real token's output, ``[len(idx), d]`` (the last block's
    feed-forward half runs at that token only)."""
    width = max(cached[i].shape[0] for i in idx)
    d = cached[idx[0]].shape[-1]
    x = torch.zeros(len(idx), width, d)
    last = torch.tensor([cached[i].shape[0] - 1 for i in idx])
    for j, i in enumerate(idx):
        x[j, : cached[i].shape[0]] = cached[i]
    with top_blocks_only(model, start) as top, last_block_at(model, torch.arange(len(idx)), last):
        return top(inputs_embeds=x, use_cache=False).last_hidden_state[0]


def _features(model: torch.nn.Module, start: int, cached: Sequence[torch.Tensor]) -> torch.Tensor:
    """The last-token outputs of every cached sequence, in batches of 64 (no gradients tracked
    by the caller's choice)."""
    return torch.cat([_last_states(model, start, cached, list(range(s, min(s + 64, len(cached)))))
                      for s in range(0, len(cached), 64)])


def _capture_by_length(lm: LoadedModel, layer: int, seqs: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Block ``layer``'s outputs of ``seqs`` (fp32, in their order), computed in batches of similar
    length (in random order each batch would be padded to its longest)."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = capture_residuals(lm, layer, [seqs[i] for i in order], batch_size=32)
    cached: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
    for i, h in zip(order, out, strict=True):
        cached[i] = h
    return cached


def nmse(pred: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the sqrt(d)-normalised vectors (the release's mse_nrm)."""
    return ((normalise(pred) - normalise(gold)) ** 2).mean()


def length_batches(lengths: Sequence[int], batch: int, generator: torch.Generator) -> list[list[int]]:
    """Batches of similar length (little padding), in a seeded random order each epoch: indices
    are shuffled, sorted by length within windows of 8 batches, cut into batches, and the batches
    shuffled."""
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch * 8
    out = []
    for s in range(0, len(perm), window):
        chunk = sorted(perm[s:s + window], key=lambda i: lengths[i])
        out.extend(chunk[j:j + batch] for j in range(0, len(chunk), batch))
    order = torch.randperm(len(out), generator=generator).tolist()
    return [out[i] for i in order]


@attrs.frozen
class ArSchedule:
    """How the AR trains: its top ``blocks`` blocks and the head, ``epochs`` passes in batches of
    ``batch`` at learning rate ``lr``, shuffled from ``seed``."""

    blocks: int
    epochs: int
    batch: int
    lr: float
    seed: int


def train_ar(lm: LoadedModel, prompt_ids: Callable[[str], list[int]], train: tuple[Sequence[str], torch.Tensor],
             held_out: tuple[Sequence[str], torch.Tensor], fit_head: Callable[[torch.Tensor], torch.Tensor],
             schedule: ArSchedule, *, progress: bool = True,
             autocast: Callable[[], Any] = contextlib.nullcontext,
             frozen_model: LoadedModel | None = None) -> tuple[torch.Tensor, dict]:
    """Fine-tune the top ``schedule.blocks`` blocks of ``lm`` (the AR backbone, blocks 0..K) and a
    value head (``[d, d]``, applied as ``features @ W``) in place on ``train`` (texts, gold
    vectors), measuring ``held_out`` each epoch; returns ``(W, curves)``. The head starts
    from ``fit_head(frozen last-token features)`` (the closed-form ridge fit). The frozen lower
    blocks run once, on ``frozen_model`` when given (the base model in the training dtype; it is
    unloaded afterwards), else on ``lm`` under ``autocast``; ``autocast`` wraps every pass of the
    trained blocks (training, the ridge fit's features, the evaluations: bf16 where the machine's
    probe picks it, as the run then loads the AR); the loss and the head stay fp32. The training-set fit is measured before
    training (from the frozen features already computed) and after the last epoch only (a pass
    over the whole training set each epoch cost a third of the training)."""
    (texts, gold), (eval_texts, eval_gold) = train, held_out
    blocks, epochs, batch, lr, seed = schedule.blocks, schedule.epochs, schedule.batch, schedule.lr, schedule.seed

    model = lm.model
    n_layers = len(model.get_decoder().layers)
    start = n_layers - blocks
    seqs = [prompt_ids(t) for t in texts]
    eval_seqs = [prompt_ids(t) for t in eval_texts]
    capture_lm = frozen_model or lm
    with contextlib.nullcontext() if frozen_model is not None else autocast():
        cached = _capture_by_length(capture_lm, start - 1, seqs)
        eval_cached = _capture_by_length(capture_lm, start - 1, eval_seqs)
    if frozen_model is not None:
        frozen_model.unload()
    with raw_residual(model), torch.no_grad(), autocast():
        model.eval()
        frozen = _features(model, start, cached).float()
    head = torch.nn.Parameter(fit_head(frozen).clone().float())
    trainable = [p for blk in list(model.get_decoder().layers)[start:] for p in blk.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([*trainable, head], lr=lr, weight_decay=0.0, fused=True)
    steps_total = epochs * math.ceil(len(seqs) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps_total))
    g = torch.Generator().manual_seed(seed)
    base_eval = baseline_variance(eval_gold)
    base_train = baseline_variance(gold)
    curves: dict[str, Any] = {"epoch": [], "train_fve_nrm": [], "heldout_fve_nrm": [],
                              "blocks_trained": blocks, "epochs": epochs, "lr": lr, "batch": batch}

    def evaluate(which: Sequence[torch.Tensor] | torch.Tensor, target: torch.Tensor, base: float) -> float:
        """fve_nrm of the head on ``which``: cached block inputs (their features computed as the
        training computes them, under ``autocast``), or features already computed."""
        model.eval()
        with torch.no_grad():
            if torch.is_tensor(which):
                feats = which
            else:
                with autocast():
                    feats = _features(model, start, which).float()
            preds = feats @ head
        curves["pred_norm_mean"] = float(preds.norm(dim=-1).mean())
        return 1.0 - float(nmse(preds, target)) / base

    bar = progress_bar(enabled=progress, total=steps_total, desc="nla mini: train AR")
    with raw_residual(model):
        curves["epoch"].append(0)
        curves["heldout_fve_nrm"].append(evaluate(eval_cached, eval_gold, base_eval))
        curves["train_fve_nrm"].append(evaluate(frozen, gold, base_train))  # the untrained blocks' features
        for epoch in range(1, epochs + 1):
            model.train()
            for idx in length_batches([len(sq) for sq in seqs], batch, g):
                with autocast():
                    feats = _last_states(model, start, cached, idx)
                loss = nmse(feats.float() @ head, gold[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([*trainable, head], 1.0)
                opt.step()
                sched.step()
                bar.update(1)
            curves["epoch"].append(epoch)
            curves["heldout_fve_nrm"].append(evaluate(eval_cached, eval_gold, base_eval))
            if epoch == epochs:  # last: its prediction norm is kept (the head's output scale)
                curves["train_fve_nrm"].append(evaluate(cached, gold, base_train))
            bar.set_postfix(train=f"{curves['train_fve_nrm'][-1]:.3f}", heldout=f"{curves['heldout_fve_nrm'][-1]:.3f}")
    bar.close()
    model.eval()
    model.requires_grad_(False)
    return head.detach().clone(), curves
