"""The tables of a run directory: their column schemas, and the one check every reader applies.

Writers build their frames with these schemas (``run/cells.py``, ``score/sample.py``); readers
(the runner's resumed units, the shard merge, the report) go through :func:`read_table`, so a
table that does not match docs/schemas.md stops with one line (:class:`ConfigError`: the file,
what is wrong, the fix) before any statistic touches it. Pure polars, no torch: ``score``,
``run`` and ``report`` all import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import polars as pl

from steercmp.errors import ConfigError

CELL_SCHEMA: dict[str, Any] = {
    "prompt_id": pl.String, "method": pl.String, "condition": pl.String, "alpha": pl.Float64,
    "scaling": pl.String, "position": pl.Int64, "inject_pos": pl.Int64, "score_pos": pl.Int64,
    "delta_norm": pl.Float64, "logmass_edited": pl.Float64, "logmass_original": pl.Float64,
    "logmass_unrelated": pl.Float64, "score": pl.Float64, "kl_unsteered": pl.Float64, "kl_offtarget": pl.Float64,
    "delta_survival": pl.Float64, "status": pl.String, "meta": pl.String,
}
#: cell columns a reader accepts missing (descriptive only; runs written before they existed lack
#: them); when missing they are added as nulls
CELL_OPTIONAL = ("kl_unsteered", "kl_offtarget", "delta_survival")
COMPLETION_SCHEMA: dict[str, Any] = {
    "prompt_id": pl.String, "method": pl.String, "condition": pl.String, "alpha": pl.Float64,
    "scaling": pl.String, "seed": pl.Int64, "text": pl.String, "line": pl.String,
    "hit_original": pl.Boolean, "hit_edited": pl.Boolean, "hit_unrelated": pl.Boolean,
    "end_original": pl.Boolean, "end_edited": pl.Boolean, "end_unrelated": pl.Boolean,
    "status": pl.String,
}
#: ``matched.parquet``: every method and control at the prompt's side-effect budget (run/match.py)
MATCHED_SCHEMA: dict[str, Any] = {
    "prompt_id": pl.String, "method": pl.String, "condition": pl.String, "draw": pl.Int64, "status": pl.String,
    "budget": pl.Float64, "budget_source": pl.String, "multiplier": pl.Float64, "ratio": pl.Float64,
    "delta_norm": pl.Float64, "kl_offtarget": pl.Float64, "kl_unsteered": pl.Float64,
    "logmass_edited": pl.Float64, "logmass_original": pl.Float64, "logmass_unrelated": pl.Float64,
    "score": pl.Float64, "evals": pl.Int64, "oracle_assisted": pl.Boolean,
}
#: every status of a matched row: the dose search's outcome, or why there is no score
MATCHED_STATUSES = ("ok", "matched", "fixed", "off_budget", "unreachable", "not_dose_matched", "zero_delta",
                    "no_budget", "dropped", "fallback", "below_fidelity", "not_applicable", "error")
#: ``units/completions/baseline-<key>.parquet``: one prompt's unsteered samples, one per seed
BASELINE_SCHEMA: dict[str, Any] = {"prompt_id": pl.String, "seed": pl.Int64, "text": pl.String}
#: completion columns a reader accepts missing (descriptive only: no statistic reads them, and
#: tables written before they existed lack them); when missing they are added as nulls
END_COLUMNS = ("end_original", "end_edited", "end_unrelated")
#: every row status of cells.parquet and completions.parquet (docs/schemas.md)
STATUSES = ("ok", "editable", "fallback", "below_fidelity", "dropped", "not_applicable", "error")
TARGET = "target_edit"
#: columns that identify a row: never null
ROW_KEYS = ("prompt_id", "method", "condition", "alpha", "scaling", "status")


@attrs.frozen
class TableSpec:
    """One kind of table: ``doc`` is its heading in docs/schemas.md."""

    doc: str
    columns: Mapping[str, Any] = attrs.field(hash=False)
    optional: tuple[str, ...] = ()
    not_null: tuple[str, ...] = ROW_KEYS
    rows: bool = True  # status and condition values are checked
    needs_target: bool = False
    extra_columns: bool = True


CELLS = TableSpec("cells.parquet", CELL_SCHEMA, optional=CELL_OPTIONAL, needs_target=True)
COMPLETIONS = TableSpec("completions.parquet", COMPLETION_SCHEMA, optional=END_COLUMNS)
SCORE_UNIT = TableSpec("units/score/<key>.parquet", CELL_SCHEMA, optional=CELL_OPTIONAL, extra_columns=False)
COMPLETION_UNIT = TableSpec("units/completions/<key>.parquet", COMPLETION_SCHEMA, optional=END_COLUMNS,
                            extra_columns=False)
MATCHED = TableSpec("matched.parquet", MATCHED_SCHEMA, not_null=("prompt_id", "method", "condition", "draw", "status"),
                    rows=False)
MATCHED_UNIT = TableSpec("units/match/<key>.parquet", MATCHED_SCHEMA,
                         not_null=("prompt_id", "method", "condition", "draw", "status"), rows=False,
                         extra_columns=False)
BASELINE_UNIT = TableSpec("units/completions/baseline-<key>.parquet", BASELINE_SCHEMA,
                          not_null=tuple(BASELINE_SCHEMA), rows=False, extra_columns=False)


def read_table(path: str | Path, spec: TableSpec, *, require_target: bool | None = None,
               fix: str | None = None) -> pl.DataFrame:
    """Read one parquet table and :func:`check_table` it; an unreadable file is a ConfigError too."""
    path = Path(path)
    try:
        frame = pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError) as exc:
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigError(f"{path.name} is not a readable parquet file ({type(exc).__name__}: {reason})",
                          where=str(path.parent),
                          fix=fix or f"write it as parquet with the columns listed in docs/schemas.md ({spec.doc})"
                          ) from None
    return check_table(frame, spec, name=path.name, where=str(path.parent), require_target=require_target,
                       fix=fix)


def check_table(frame: pl.DataFrame, spec: TableSpec, *, name: str | None = None, where: str | None = None,
                require_target: bool | None = None, fix: str | None = None) -> pl.DataFrame:
    """``frame`` checked against ``spec``: required columns, dtypes, nulls in the row keys, status
    and condition values, and (``require_target``, default ``spec.needs_target``) target_edit rows.

    A column of another dtype is cast when the cast loses nothing (an all-null column, integers
    where floats are expected, Float32 -> Float64, Categorical -> String); missing optional
    columns are added as nulls. Returns the frame with the schema's columns first, in schema
    order; raises :class:`ConfigError` naming ``name`` (default ``spec.doc``) otherwise."""
    name = name or spec.doc
    col_fix = fix or f"write the columns listed in docs/schemas.md ({spec.doc})"

    def fail(message: str, how: str) -> ConfigError:
        return ConfigError(f"{name} {message}", where=where, fix=how)

    missing = [c for c in spec.columns if c not in frame.columns and c not in spec.optional]
    if missing:
        what = "column" if len(missing) == 1 else "columns"
        raise fail(f"has no {what} {', '.join(repr(c) for c in missing)}", col_fix)
    extra = [c for c in frame.columns if c not in spec.columns]
    if extra and not spec.extra_columns:
        raise fail(f"has unexpected column {extra[0]!r}", col_fix)
    cast, wrong = [], []
    for col, dtype in spec.columns.items():
        if col not in frame.columns:
            cast.append(pl.repeat(None, frame.height, dtype=dtype, eager=True).alias(col))
        elif frame.schema[col] != dtype:
            series = _lossless_cast(frame.get_column(col), dtype)
            if series is None:
                wrong.append(f"column {col!r} is {frame.schema[col]}, not {dtype}")
            else:
                cast.append(series)
    if wrong:
        raise fail("; ".join(wrong), col_fix)
    frame = frame.with_columns(cast).select(*spec.columns, *extra)
    for col in spec.not_null:
        nulls = frame.get_column(col).null_count()
        if nulls:
            raise fail(f"has a null {col!r} in {_rows(nulls)}",
                       fix or f"give every row a {col} (docs/schemas.md, {spec.doc})")
    if spec.rows:
        _check_rows(frame, spec, fail, fix)
    if (spec.needs_target if require_target is None else require_target) and \
            not (frame.get_column("condition") == TARGET).any():
        found = sorted(set(frame.get_column("condition").to_list()))
        which = f"conditions: {', '.join(found)}" if found else "no rows at all"
        raise fail(f"has no {TARGET} rows ({which})", fix or f"write every method's {TARGET} rows "
                                                          f"(docs/schemas.md, {spec.doc})")
    return frame


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def _check_rows(frame: pl.DataFrame, spec: TableSpec, fail: Any, fix: str | None) -> None:
    status = frame.get_column("status")
    bad = status.filter(~status.is_in(list(STATUSES)))
    if bad.len():
        raise fail(f"has status {bad[0]!r} in {_rows(int((status == bad[0]).sum()))}, not one of "
                   f"{', '.join(STATUSES)}", fix or f"use the statuses listed in docs/schemas.md ({spec.doc})")
    empty = int((frame.get_column("condition").str.strip_chars() == "").sum())
    if empty:
        raise fail(f"has an empty condition in {_rows(empty)}",
                   fix or f"name every row's condition (docs/schemas.md, {spec.doc})")


def _lossless_cast(series: pl.Series, dtype: Any) -> pl.Series | None:
    """``series`` cast to ``dtype`` when nothing is lost (checked by casting back), else None."""
    src = series.dtype
    if src == pl.Null:
        return series.cast(dtype)
    if src.base_type() in (pl.Categorical, pl.Enum) and dtype == pl.String:
        return series.cast(dtype)
    if not (src.is_numeric() and dtype.is_numeric()):
        return None
    try:
        out = series.cast(dtype, strict=True)
        back = out.cast(src, strict=True)
    except pl.exceptions.PolarsError:
        return None
    return out if back.equals(series, null_equal=True) else None
