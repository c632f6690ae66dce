"""Statistics for steercmp runs: pure functions over polars frames following docs/schemas.md.

Prompts are the unit of analysis. CIs are percentile bootstraps over prompts (seeded);
paired tests are sign-flip permutation tests (exact up to 20 prompts) with Holm correction
across controls. :func:`verdict` applies the pre-declared decision rule.
"""

from steercmp.stats._core import EXACT_MAX_N, bootstrap_mean_ci, holm, sign_flip_pvalue
from steercmp.stats.decision import NOT_SUPPORTED, SHIFT_ONLY, SUPPORTED, verdict
from steercmp.stats.format import format_summary_table
from steercmp.stats.paired import CONTROLS, TARGET, paired, paired_hits, relative_to_noop
from steercmp.stats.summary import (
    dose_response,
    heterogeneity,
    heterogeneity_table,
    hit_rates,
    peaks,
    per_prompt_hits,
    summarize,
)

__all__ = [
    "CONTROLS", "EXACT_MAX_N", "NOT_SUPPORTED", "SHIFT_ONLY", "SUPPORTED", "TARGET",
    "bootstrap_mean_ci", "dose_response", "format_summary_table", "heterogeneity",
    "heterogeneity_table", "hit_rates", "holm", "paired", "paired_hits", "peaks",
    "per_prompt_hits", "relative_to_noop", "sign_flip_pvalue", "summarize", "verdict",
]
