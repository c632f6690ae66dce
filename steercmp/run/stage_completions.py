"""The completions stage: sampled continuations of every cell at the completion alphas (the
alpha sweep's behavioural view), one resumable (method, prompt) unit at a time; and every
prompt's unsteered samples, drawn once and shared by all methods and the match stage."""

from __future__ import annotations

import time
from typing import Any

import attrs
import polars as pl

from steercmp.api import PromptContext
from steercmp.run.cells import Cell, CellBook
from steercmp.run.rundir import write_parquet
from steercmp.run.stage_context import RECOMPUTE, StageContext, by_prompt
from steercmp.schemas import BASELINE_SCHEMA, BASELINE_UNIT, CELLS, COMPLETION_UNIT, read_table
from steercmp.score.sample import COMPLETION_SCHEMA, sample_baseline, sample_completions


def baselines(ctx: StageContext, contexts: list[PromptContext]) -> dict[tuple[tuple[int, ...], int], str]:
    """Every prompt's unsteered completions (one unit per prompt, shared by all methods)."""
    out: dict[tuple[tuple[int, ...], int], str] = {}
    for pc in contexts:
        path = ctx.rundir.unit("completions", f"baseline-{ctx.keys.completion_baseline(pc.prompt.id)}")
        context = tuple(pc.input_ids[: pc.score_pos + 1])
        if ctx.fresh or not path.exists():
            texts = sample_baseline(ctx.resources.base(), ctx.sampling, pc.prompt.id, context)
            write_parquet(path, pl.DataFrame({"prompt_id": [pc.prompt.id] * len(texts),
                                              "seed": list(range(len(texts))), "text": texts},
                                             schema=BASELINE_SCHEMA))
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
    baseline = baselines(ctx, [c for c in contexts if any(u[1] == c.prompt.id for u in todo)]) if todo else {}
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

    def sample(cells: list[Cell]) -> pl.DataFrame:
        return sample_completions(ctx.resources.base(), ctx.sampling, cells, ctx.families, baseline=baseline)

    # one sampling batch per prompt over all its pending methods (each row keeps its own
    # generator, so a row's text does not depend on its batch); a failure retries method by
    # method so only the method at fault is dropped
    for pid, group in ctx.progress(by_prompt(todo), "completion prompts", len({u[1] for u in todo})):
        group = [(m, k) for m, k in group if m not in failed]
        try:
            frames = {None: sample([c for m, _ in group for c in chosen(m, pid)])}
        except Exception:
            frames = {}
            for method, _ in group:
                try:
                    frames[method] = sample(chosen(method, pid))
                except Exception as exc:
                    ctx.fail(method, "sampling completions", exc)
                    failed.add(method)
        for method, ukey in group:
            if method in failed:
                continue
            df = frames[method] if method in frames else frames[None].filter(pl.col("method") == method)
            write_parquet(ctx.rundir.unit("completions", ukey), df)
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
