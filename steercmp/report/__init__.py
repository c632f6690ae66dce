"""The comparison report: polars transforms -> Altair chart builders -> one writer."""

from steercmp.report.writer import write_report
from steercmp.stats.format import format_summary_table

__all__ = ["format_summary_table", "write_report"]
