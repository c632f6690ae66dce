"""The completions stage: sampled continuations of every cell at the completion alphas (the
alpha sweep's behavioural view), one resumable (method, prompt) unit at a time; and every
prompt's unsteered samples, drawn once and shared by all methods and the match stage."""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from typing import Any

import attrs
import polars as pl

from steercmp.api import PromptContext
from steercmp.run.cells import Cell, CellBook
from steercmp.run.rundir import write_parquet
from steercmp.run.stage_context import RECOMPUTE, StageContext, by_group
from steercmp.schemas import BASELINE_SCHEMA, BASELINE_UNIT, CELLS, COMPLETION_UNIT, read_table
from steercmp.score.sample import COMPLETION_SCHEMA, sample_baselines, sample_completions


def baselines(ctx: StageContext, contexts: Sequence[PromptContext], wanted: Collection[str]
              ) -> dict[tuple[tuple[int, ...], int], str]:
    """The unsteered completions of the prompts in ``wanted`` (one unit per prompt, shared by all
    methods), sampled a whole sampling group at a time (consecutive battery prompts,
    :meth:`steercmp.run.keys.RunKeys.sample_groups`): a group is drawn in one batch even when one
    of its prompts is wanted, so a text does not depend on who asked for it. Under ``--fresh`` a
    group is drawn once per run (the match stage reuses what the completions stage drew)."""
    by_id = {pc.prompt.id: pc for pc in contexts}
    out: dict[tuple[tuple[int, ...], int], str] = {}
    wanted = set(wanted)
    for group in ctx.keys.sample_groups():
        members = [by_id[pid] for pid in group if pid in by_id]
        if not wanted.intersection(group) or not members:
            continue
        paths = [ctx.rundir.unit("completions", f"baseline-{ctx.keys.completion_baseline(pc.prompt.id)}")
                 for pc in members]
        stale = ctx.fresh and not all(p in ctx.resources.written_this_run for p in paths)
        if stale or not all(p.exists() for p in paths):
            texts = sample_baselines(ctx.resources.base(), ctx.sampling,
                                     [(pc.prompt.id, pc.input_ids[: pc.score_pos + 1]) for pc in members])
            for pc, path, rows in zip(members, paths, texts, strict=True):
                write_parquet(path, pl.DataFrame({"prompt_id": [pc.prompt.id] * len(rows),
                                                  "seed": list(range(len(rows))), "text": rows},
                                                 schema=BASELINE_SCHEMA))
                ctx.resources.written_this_run.add(path)
        for pc, path in zip(members, paths, strict=True):
            if pc.prompt.id in wanted:
                context = tuple(pc.input_ids[: pc.score_pos + 1])
                for r in read_table(path, BASELINE_UNIT, fix=RECOMPUTE).iter_rows(named=True):
                    out[(context, r["seed"])] = r["text"]
    return out


def stage_completions(ctx: StageContext, book: CellBook, contexts: list[PromptContext],
                      scored: pl.DataFrame | None = None) -> None:
    """Sample completions one (method, prompt) unit at a time; finished units are reused."""
    units = ctx.keys.units("completions", book.methods)
    key = ctx.keys.units_stage("completions", units)
    if ctx.reusable("completions", key, ctx.rundir.completions):
        ctx.ledger.reused.append("completions")
        return
    t = time.perf_counter()
    if scored is None and ctx.rundir.cells.exists():
        scored = read_table(ctx.rundir.cells, CELLS, require_target=False, fix=RECOMPUTE)
    errors: set[Any] = set()
    if scored is not None:
        errors = set(scored.filter(pl.col("status") == "error")
                     .select("prompt_id", "method", "condition", "alpha", "scaling").iter_rows())
    units, todo, key = ctx.pending("completions", units, key, book)
    baseline = baselines(ctx, contexts, {u[1] for u in todo}) if todo else {}
    failed: set[str] = set()

    def chosen(method: str, pid: str) -> list[Cell]:
        out = []
        for c in book.cells(method, pid):
            if c.alpha not in ctx.completions.alphas:
                continue
            if (c.prompt_id, c.method, c.condition, c.alpha, c.scaling) in errors:
                c = attrs.evolve(c, row=None, status="error")
            out.append(c)
        return out

    def sample(units: Sequence[tuple[str, str, str]]) -> pl.DataFrame:
        cells = [c for m, pid, _ in units for c in chosen(m, pid)]
        return sample_completions(ctx.resources.base(), ctx.sampling, cells, ctx.families, baseline=baseline)

    # one sampling batch per group of prompts (the baselines' groups) over all their pending
    # methods: the unsteered rows of the group's contexts (prompting texts, counterfactual
    # couplets) share a batch, the injected rows one per context; a failure retries method by
    # method so only the method at fault is dropped
    groups = by_group(todo, ctx.keys.sample_groups())
    for group in ctx.progress(groups, "completion groups", len(groups)):
        group = [u for u in group if u[0] not in failed]
        try:
            frames = {None: sample(group)}
        except Exception:
            frames = {}
            for method in dict.fromkeys(m for m, _, _ in group):
                try:
                    frames[method] = sample([u for u in group if u[0] == method])
                except Exception as exc:
                    ctx.fail(method, "sampling completions", exc)
                    failed.add(method)
        for method, pid, ukey in group:
            if method in failed:
                continue
            df = frames[method] if method in frames else frames[None]
            write_parquet(ctx.rundir.unit("completions", ukey),
                          df.filter((pl.col("method") == method) & (pl.col("prompt_id") == pid)))
    frames = [read_table(ctx.rundir.unit("completions", u), COMPLETION_UNIT, fix=RECOMPUTE)
              for m, _, u in units if m not in failed]
    df = pl.concat(frames, how="vertical") if frames else pl.DataFrame(schema=COMPLETION_SCHEMA)
    df = df.sort("method", "condition", "scaling", "alpha", "prompt_id", "seed", nulls_last=True)
    write_parquet(ctx.rundir.completions, df)
    if not failed:
        ctx.mark_done("completions", key)
    if todo:
        ctx.resources.note("completions")
    ctx.ledger.timings["completions"] = time.perf_counter() - t


__all__ = ["baselines", "stage_completions"]
