"""The extract stage: each battery prompt's residual at the injection layer, once per run.

Writes ``activations.safetensors`` and ``contexts.json`` (token ids and positions); a rerun with
the same key reads them back as :class:`~steercmp.api.PromptContext` objects.
"""

from __future__ import annotations

import time

import torch

from steercmp.api import PromptContext
from steercmp.errors import ConfigError, NumericalError
from steercmp.lm.capture import extract
from steercmp.lm.prompts import tokenize_battery
from steercmp.run.rundir import read_json, read_tensors, write_json, write_tensors
from steercmp.run.stage_context import StageContext


def stage_extract(ctx: StageContext, run: bool = True) -> list[PromptContext]:
    """Extract (or, when finished or not asked to ``run``, read back) every prompt's context."""
    layer, model = ctx.sweep.layer, ctx.model
    key = ctx.keys.extract()
    paths = (ctx.rundir.activations, ctx.rundir.contexts)
    if ctx.reusable("extract", key, *paths) or (not run and paths[0].exists()):
        ctx.ledger.reused.append("extract")
        return load_contexts(ctx)
    if not run:
        raise ConfigError("no extracted activations in this run directory", where=str(ctx.run_dir),
                          fix="run `--step extract` first (or `--step all`)")
    t = time.perf_counter()
    ctx.log(f"[extract] {model.id} layer {layer}, {len(ctx.battery)} prompts")
    lm = ctx.resources.base()
    if not 0 <= layer < lm.num_layers:
        raise ConfigError(f"layer {layer} is out of range for {model.id} ({lm.num_layers} blocks)",
                          where=f"{ctx.source}: layer", fix=f"use 0..{lm.num_layers - 1}")
    if ctx.tokens is None:  # a stage called without the runner's preflight
        ctx.tokens = tokenize_battery(ctx.battery, lm.tokenizer, chat_template=model.chat_template,
                                      require_single_token=ctx.single_token_families)
    contexts = extract(lm, layer, ctx.battery.prompts, chat_template=model.chat_template,
                       progress=ctx.progress, tokens=ctx.tokens)
    for c in contexts:
        if not torch.isfinite(c.resid).all():
            raise NumericalError(
                f"the base model produced NaN or inf activations at layer {layer} for prompt "
                f"{c.prompt.id!r}", where=f"{ctx.source}: model.id",
                fix="check the checkpoint's weights, or use float32 instead of float16")
    write_tensors(ctx.rundir.activations, {c.prompt.id: c.resid for c in contexts},
                  {"layer": str(layer), "model": model.id})
    write_json(ctx.rundir.contexts, {c.prompt.id: {"input_ids": list(c.input_ids), "inject_pos": c.inject_pos,
                                                   "score_pos": c.score_pos} for c in contexts})
    ctx.mark_done("extract", key)
    ctx.resources.note("extract")
    ctx.ledger.timings["extract"] = time.perf_counter() - t
    return contexts


def load_contexts(ctx: StageContext) -> list[PromptContext]:
    """The extracted contexts of a finished extract stage."""
    tensors = read_tensors(ctx.rundir.activations)
    meta = read_json(ctx.rundir.contexts)
    return [PromptContext(prompt=p, input_ids=tuple(meta[p.id]["input_ids"]),
                          inject_pos=meta[p.id]["inject_pos"], score_pos=meta[p.id]["score_pos"],
                          layer=ctx.sweep.layer, resid=tensors[p.id])
            for p in ctx.battery.prompts]


__all__ = ["load_contexts", "stage_extract"]
