"""The locate stage: a causal site scan through the run's machinery (model, keys, units, resume).

For every battery prompt and target family a counterfactual couplet changes the plan
(:mod:`steercmp.lm.couplet_counterfactual`); each (layer, position) site's residual is patched
into the original run and the target-minus-original shift at the rhyme slot is measured
(:mod:`steercmp.score.patching`). The base model comes from the run's
:class:`~steercmp.run.runtime.ResourceManager`, every layer is one unit keyed by
:meth:`~steercmp.run.keys.RunKeys.locate_unit`, and finished layers are reused unless ``--fresh``.

A (prompt, family, construction) with no same-length counterfactual is dropped and recorded,
as the positive control of ``run`` drops its prompt; only a scan left with nothing is refused.
:func:`plan_locate` checks everything and writes nothing; :func:`stage_locate` writes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import attrs
import polars as pl

from steercmp.api import Prompt
from steercmp.couplets import CONSTRUCTIONS, same_rhyme
from steercmp.errors import ConfigError
from steercmp.lm.couplet_counterfactual import (
    Counterfactual,
    NoCounterfactual,
    build_counterfactual,
)
from steercmp.lm.prompts import TokenizedPrompt
from steercmp.run.rundir import write_parquet
from steercmp.run.stage_context import StageContext
from steercmp.score.patching import prepare, scan_layer

FAMILIES = ("edited", "unrelated")
Pair = tuple[Prompt, TokenizedPrompt, Counterfactual]


@attrs.frozen
class LocateScan:
    """What to scan: target families, counterfactual constructions (``auto``: swap and block
    for a family that rhymes with the plan, cue otherwise), layers (None: every layer) and the
    positions as offsets from the line break (None: the line-end word to the rhyme slot)."""

    families: tuple[str, ...] = FAMILIES
    constructions: tuple[str, ...] = ("auto",)
    layers: tuple[int, ...] | None = None
    offsets: tuple[int, int] | None = None

    def __attrs_post_init__(self) -> None:
        bad = [f for f in self.families if f not in FAMILIES]
        if bad or not self.families:
            problem = f"unknown target family {bad[0]!r}" if bad else "no target family given"
            raise ConfigError(problem, where="--families", fix="use edited, unrelated or both")
        if self.constructions != ("auto",) and any(c not in CONSTRUCTIONS for c in self.constructions):
            raise ConfigError(f"unknown construction in {','.join(self.constructions)!r}", where="--constructions",
                              fix=f"use auto or a comma list of {', '.join(CONSTRUCTIONS)}")

    def kinds(self, prompt: Prompt, family: str) -> Sequence[str]:
        if self.constructions != ("auto",):
            return self.constructions
        return ("swap", "block") if same_rhyme(prompt, family) else ("cue",)


@attrs.frozen(eq=False)
class LocatePlan:
    """A checked scan: the layers, the counterfactual pairs, what was dropped and why, and each
    layer's unit key."""

    scan: LocateScan
    layers: tuple[int, ...]
    pairs: tuple[Pair, ...]
    dropped: tuple[dict[str, str], ...]
    units: tuple[tuple[int, str], ...]

    def meta(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "offsets": self.scan.offsets, "pairs": len(self.pairs),
                "counterfactuals": [{"prompt_id": p.id, "family": c.family, "construction": c.construction,
                                     "word": c.word} for p, _t, c in self.pairs],
                "dropped": list(self.dropped)}


def plan_locate(ctx: StageContext, scan: LocateScan) -> LocatePlan:
    """Load the base model, check the layers and offsets, build the counterfactuals (dropping
    those that cannot exist) and key each layer. Raises ConfigError; writes nothing."""
    lm = ctx.resources.base()
    n_layers = lm.num_layers
    layers = tuple(range(n_layers)) if scan.layers is None else scan.layers
    outside = [x for x in layers if not 0 <= x < n_layers]
    if outside:
        raise ConfigError(f"layer {outside[0]} is outside the model (0..{n_layers - 1})", where="--layers",
                          fix=f"use layers 0..{n_layers - 1}")
    tokens = ctx.tokens
    assert tokens is not None, "Runner.locate tokenizes the battery (preflight) before planning"
    pairs: list[Pair] = []
    dropped: list[dict[str, str]] = []
    for prompt in ctx.battery.prompts:
        tok = tokens[prompt.id]
        if scan.offsets is not None and scan.offsets[1] > tok.score_pos - tok.inject_pos:
            raise ConfigError(f"offset {scan.offsets[1]:+d} is past prompt {prompt.id!r}'s last token "
                              f"({tok.score_pos - tok.inject_pos:+d})", where="--offsets",
                              fix="end the range at or before the rhyme slot of the shortest prompt")
        for family in scan.families:
            for construction in scan.kinds(prompt, family):
                try:
                    cf = build_counterfactual(lm.tokenizer, prompt, family, construction,
                                              chat_template=ctx.model.chat_template, where=ctx.battery.source)
                except NoCounterfactual as exc:
                    dropped.append({"prompt_id": prompt.id, "family": family, "construction": construction,
                                    "reason": exc.message})
                    continue
                pairs.append((prompt, tok, cf))
    if not pairs:
        first = dropped[0]
        raise ConfigError(f"no prompt has a same-length counterfactual to scan (first: prompt "
                          f"{first['prompt_id']!r}, {first['family']}, {first['construction']}: {first['reason']})",
                          where=ctx.battery.source,
                          fix="add family words that tokenize to the line-end word's length, or another construction")
    described = [(p.id, c.family, c.construction, c.word) for p, _t, c in pairs]
    units = tuple((layer, ctx.keys.locate_unit(layer, described, scan.offsets)) for layer in layers)
    return LocatePlan(scan=scan, layers=layers, pairs=tuple(pairs), dropped=tuple(dropped), units=units)


def stage_locate(ctx: StageContext, plan: LocatePlan) -> pl.DataFrame:
    """Scan every layer of ``plan`` (one unit each, finished ones reused); one row per prompt,
    counterfactual and site."""
    t = time.perf_counter()
    todo = [(layer, key) for layer, key in plan.units if ctx.fresh or not ctx.rundir.unit("locate", key).exists()]
    ctx.ledger.reused_units["locate"] = {"reused": len(plan.units) - len(todo), "computed": len(todo)}
    ctx.log(f"[locate] {len(plan.units)} units (layers): {len(plan.units) - len(todo)} reused, {len(todo)} to compute")
    for entry in plan.dropped:
        ctx.log(f"[locate] dropped prompt {entry['prompt_id']!r} ({entry['family']}, {entry['construction']}): "
                f"{entry['reason']}")
    if todo:
        lm = ctx.resources.base()
        patch = prepare(lm, plan.layers, plan.pairs, batch_size=ctx.sweep.batch_size)
        for layer, key in ctx.progress(todo, "locate layers", len(todo)):
            rows = scan_layer(lm, patch, layer, batch_size=ctx.sweep.batch_size, offsets=plan.scan.offsets)
            write_parquet(ctx.rundir.unit("locate", key), pl.DataFrame(rows))
        ctx.resources.note("locate")
    frames = [pl.read_parquet(ctx.rundir.unit("locate", key)) for _layer, key in plan.units]
    ctx.mark_done("locate", ctx.keys.stage("locate", [key for _layer, key in plan.units]))
    ctx.ledger.timings["locate"] = time.perf_counter() - t
    return pl.concat([f for f in frames if f.height], how="vertical")


__all__ = ["FAMILIES", "LocatePlan", "LocateScan", "plan_locate", "stage_locate"]
