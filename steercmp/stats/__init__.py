"""Statistics for steercmp runs: pure functions over polars frames following docs/schemas.md.

Prompts are the unit of analysis (completion seeds are averaged within a prompt first). CIs are
percentile bootstraps over prompts (seeded); paired tests are one-sided exact sign-flip tests;
:func:`verdict` applies the pre-declared intersection-union decision rule and
:mod:`steercmp.stats.power` says what a battery of n prompts can detect (docs/statistics.md).
"""

from steercmp.stats._core import EXACT_MAX_N, bootstrap_mean_ci, holm, sign_flip_pvalue
from steercmp.stats.decision import (
    CORRECTIONS,
    NOT_SUPPORTED,
    SHIFT_ONLY,
    SUPPORTED,
    UNDERPOWERED,
    verdict,
)
from steercmp.stats.format import format_summary_table
from steercmp.stats.matched import expected_hits, matched_verdicts, planned_power
from steercmp.stats.paired import (
    CONTROLS,
    TARGET,
    PairedTest,
    paired,
    paired_hits,
    relative_to_noop,
)
from steercmp.stats.positive_control import (
    CEILING,
    POSITIVE_CONTROL,
    absolute_logmass,
    effects_vs_noop,
    fractions,
    method_roles,
)
from steercmp.stats.power import (
    mde_in_sd,
    min_p_value,
    minimum_detectable_effect,
    prompts_for_power,
    prompts_to_reach,
)
from steercmp.stats.summary import (
    ALL,
    PRIMARY,
    SECONDARY,
    SECONDARY_STATUSES,
    dose_response,
    heterogeneity,
    heterogeneity_table,
    hit_rates,
    peaks,
    per_prompt_hits,
    summarize,
)

__all__ = [
    "ALL", "CEILING", "CONTROLS", "CORRECTIONS", "EXACT_MAX_N", "NOT_SUPPORTED", "POSITIVE_CONTROL", "PRIMARY", "SECONDARY",
    "SECONDARY_STATUSES", "SHIFT_ONLY", "SUPPORTED", "TARGET", "UNDERPOWERED", "absolute_logmass",
    "bootstrap_mean_ci",
    "dose_response", "effects_vs_noop", "format_summary_table", "fractions", "heterogeneity", "heterogeneity_table", "hit_rates", "holm",
    "mde_in_sd", "method_roles", "min_p_value", "minimum_detectable_effect", "paired", "PairedTest", "paired_hits", "peaks",
    "per_prompt_hits", "prompts_for_power", "prompts_to_reach", "relative_to_noop", "sign_flip_pvalue",
    "summarize", "verdict", "expected_hits", "matched_verdicts", "planned_power",
]
