"""Plain-text rendering of statistics tables (what the CLI prints)."""

from __future__ import annotations

import math
from typing import Any

import polars as pl


def fmt(x: Any, spec: str = "+.3f") -> str:
    """A number with ``spec``; ``NA`` for missing values."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "NA"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def fmt_ci(lo: Any, hi: Any, spec: str = "+.3f") -> str:
    return "NA" if lo is None else f"[{fmt(lo, spec)}, {fmt(hi, spec)}]"


def _num(x: float | None, signed: bool = True) -> str:
    if x is None:
        return "NA"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def format_summary_table(summary: pl.DataFrame) -> str:
    """Fixed-width table of a :func:`steercmp.stats.summarize` frame: method, scaling,
    condition, alpha, mean, median, positive as ``k/n`` and the 95% CI."""
    header = ["method", "scaling", "condition", "alpha", "mean", "median", "positive", "95% CI"]
    body = [
        [
            str(r["method"]), str(r["scaling"]), str(r["condition"]), f"{r['alpha']:g}",
            _num(r["mean"]), _num(r["median"]), f"{r['n_positive']}/{r['n']}",
            "NA" if r["ci_low"] is None else f"[{_num(r['ci_low'])}, {_num(r['ci_high'])}]",
        ]
        for r in summary.iter_rows(named=True)
    ]
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h)
              for i, h in enumerate(header)]
    right = {3, 4, 5, 6}

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in body)])
