"""The match stage: every method and control at the prompt's side-effect budget
(:mod:`steercmp.run.match`), and completions at those doses; one resumable unit per (prompt,
part): a method's own rows, or the shared controls'."""

from __future__ import annotations

import time
from typing import Any

import polars as pl

from steercmp.api import PromptContext, Proposal
from steercmp.run.match import (
    SHARED,
    Contenders,
    expand_shared,
    match_prompt,
    matched_completions,
    positive_control,
    prompt_method_completions,
    prompt_method_rows,
)
from steercmp.run.rundir import write_parquet
from steercmp.run.stage_completions import baselines
from steercmp.run.stage_context import RECOMPUTE, StageContext
from steercmp.schemas import CELLS, COMPLETION_UNIT, MATCHED_SCHEMA, MATCHED_UNIT, read_table


def stage_match(ctx: StageContext, contexts: list[PromptContext], proposals: dict[str, list[Proposal]]) -> None:
    """Dose-match and sample every prompt's pending parts together; write ``matched.parquet``
    and ``matched_completions.parquet`` from the units."""
    keys = [k for k in ctx.method_order if k in proposals]
    methods = {k: ctx.methods[k] for k in keys}
    pc = positive_control(methods, proposals)
    field = Contenders(methods, ctx.controls, pc)
    parts = [*keys, SHARED]
    units = [(c, part, ctx.keys.match_unit(c.prompt.id, part, pc)) for c in contexts for part in parts]
    key = ctx.keys.stage("match", [u for _, _, u in units])
    if ctx.reusable("match", key, ctx.rundir.matched):
        ctx.ledger.reused.append("match")
        return
    t = time.perf_counter()
    todo = [u for u in units if ctx.fresh or not ctx.rundir.unit("match", u[2]).exists()]
    ctx.ledger.reused_units["match"] = {"reused": len(units) - len(todo), "computed": len(todo)}
    ctx.log(f"[match] {len(units)} units (prompt x method, and shared controls): {len(units) - len(todo)} "
            f"reused, {len(todo)} to dose-match")
    cells = read_table(ctx.rundir.cells, CELLS, require_target=False, fix=RECOMPUTE) \
        if ctx.rundir.cells.exists() else None
    by_key: dict[str, dict[str, dict[str, Proposal]]] = {k: {} for k in keys}
    for k in keys:
        for p in proposals[k]:
            by_key[k].setdefault(p.prompt_id, {})[p.family] = p
    sampling = ctx.completions.enabled
    baseline = baselines(ctx, contexts, {c.prompt.id for c, _, _ in todo}) if todo and sampling else {}
    prompt_completions = prompt_method_completions(ctx.rundir, methods)
    spent = {"match:dose": 0.0, "match:completions": 0.0}
    pending: dict[str, tuple[PromptContext, list[tuple[str, str]]]] = {}
    for c, part, ukey in todo:  # a prompt's pending parts are matched and sampled together
        pending.setdefault(c.prompt.id, (c, []))[1].append((part, ukey))
    for pid, (pctx, group) in ctx.progress(pending.items(), "match prompts", len(pending)):
        lm = ctx.resources.base()
        t_unit = time.perf_counter()
        rows, dirs = match_prompt(lm, ctx.sweep, field, pctx, contexts, {k: by_key[k].get(pid, {}) for k in keys},
                                  prompt_method_rows(cells, methods, pid), [part for part, _ in group])
        for part, ukey in group:
            write_parquet(ctx.rundir.unit("match", ukey),
                          pl.DataFrame([r for r in rows if r["method"] == part], schema=MATCHED_SCHEMA))
        spent["match:dose"] += time.perf_counter() - t_unit
        if sampling:
            t_unit = time.perf_counter()
            comp = matched_completions(lm, ctx.sampling, ctx.families, pctx, rows, dirs, baseline)
            if prompt_completions is not None:  # a prompt has no dose: its sampled texts as they are
                comp = pl.concat([comp, prompt_completions.filter(pl.col("prompt_id") == pid)], how="vertical")
            for part, ukey in group:
                write_parquet(ctx.rundir.unit("match_completions", ukey), comp.filter(pl.col("method") == part))
            spent["match:completions"] += time.perf_counter() - t_unit
    injecting = [k for k in keys if methods[k].intervention == "activation"]

    def assemble(stage: str, schema: Any) -> pl.DataFrame:
        frames = [read_table(ctx.rundir.unit(stage, u), schema, fix=RECOMPUTE) for _, _, u in units]
        per_prompt = [pl.concat(frames[i:i + len(parts)], how="vertical") for i in range(0, len(frames), len(parts))]
        return pl.concat([expand_shared(f, injecting) for f in per_prompt], how="vertical")

    write_parquet(ctx.rundir.matched, assemble("match", MATCHED_UNIT))
    if sampling:
        write_parquet(ctx.rundir.matched_completions, assemble("match_completions", COMPLETION_UNIT))
    ctx.mark_done("match", key)
    if todo:
        ctx.resources.note("match")
    ctx.ledger.timings["match"] = time.perf_counter() - t
    ctx.ledger.timings.update(spent)


__all__ = ["stage_match"]
