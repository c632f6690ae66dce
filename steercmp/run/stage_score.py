"""The score stage: every cell's family log-masses and side effects through the shared sweep,
one resumable (method, prompt) unit at a time, gathered into ``cells.parquet``."""

from __future__ import annotations

import time

import polars as pl

from steercmp.errors import NumericalError
from steercmp.run.cells import CELL_SCHEMA, CellBook, score_unit
from steercmp.run.rundir import write_parquet
from steercmp.run.stage_context import RECOMPUTE, StageContext, by_prompt
from steercmp.schemas import CELLS, SCORE_UNIT, read_table


def stage_score(ctx: StageContext, book: CellBook) -> pl.DataFrame:
    """Score every cell, one (method, prompt) unit at a time; finished units are reused."""
    units = ctx.keys.units("score", book.methods)
    key = ctx.keys.units_stage("score", units)
    if ctx.reusable("score", key, ctx.rundir.cells):
        ctx.ledger.reused.append("score")
        df = read_table(ctx.rundir.cells, CELLS, require_target=False, fix=RECOMPUTE)
        report_error_cells(ctx, df)
        return df
    t = time.perf_counter()
    units, todo, key = ctx.pending("score", units, key, book)
    # one batch per prompt over all its pending methods: the prompt's prefix is computed once and
    # its unsteered rows score once; each (method, prompt) unit is still written on its own
    for pid, group in ctx.progress(by_prompt(todo), "score prompts", len({u[1] for u in todo})):
        records = score_unit(ctx.resources.base(), ctx.sweep.layer,
                             [c for method, _ in group for c in book.cells(method, pid)], ctx.sweep.batch_size)
        for method, ukey in group:
            write_parquet(ctx.rundir.unit("score", ukey),
                          pl.DataFrame([r for r in records if r["method"] == method], schema=CELL_SCHEMA))
    frames = [read_table(ctx.rundir.unit("score", u), SCORE_UNIT, fix=RECOMPUTE) for _, _, u in units]
    df = pl.concat(frames, how="vertical") if frames else pl.DataFrame(schema=CELL_SCHEMA)
    write_parquet(ctx.rundir.cells, df)
    ctx.mark_done("score", key)
    if todo:
        ctx.resources.note("score")
    ctx.ledger.timings["score"] = time.perf_counter() - t
    report_error_cells(ctx, df)
    return df


def report_error_cells(ctx: StageContext, df: pl.DataFrame) -> None:
    """NaN/inf logits never become numbers: the cells say ``error`` and the run exits 2."""
    bad = df.filter(pl.col("status") == "error")
    for method in bad["method"].unique(maintain_order=True).to_list():
        rows = bad.filter(pl.col("method") == method)
        r = rows.row(0, named=True)
        ctx.ledger.failures.append(NumericalError(
            f"method {method!r}: {rows.height} cells have NaN or inf logits (first: prompt "
            f"{r['prompt_id']!r}, {r['condition']}, alpha {r['alpha']:g}, {r['scaling']}); they are "
            "kept with status=error and no score",
            where=f"{ctx.source}: methods.{method}",
            fix="lower the alphas or the method's delta norm, or use float32"))


__all__ = ["report_error_cells", "stage_score"]
