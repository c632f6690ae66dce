"""The comparison report: statistics -> polars transforms -> Altair charts -> pages."""

from steercmp.report.writer import write_report

__all__ = ["write_report"]
