"""The decision block's values: their defaults and the one-line checks every reader applies
(the experiment reader, and ``steercmp report`` for its override flags)."""

from __future__ import annotations

import math
from typing import Any

from steercmp.errors import ConfigError

#: corrections across the methods of a run (none: each method's verdict is its own claim)
CORRECTIONS = ("none", "holm")
#: the matched-dose verdict's pre-declared defaults (docs/statistics.md says why each)
DEFAULT_MIN_EFFECT = 0.5
DEFAULT_RANDOM_DRAWS = 16


def check_level(value: Any, *, where: str) -> float:
    """A significance level strictly between 0 and 1, or a one-line error naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ConfigError(f"level {value!r} must lie strictly between 0 and 1", where=where,
                          fix="use e.g. 0.05")
    return float(value)


def check_positive(value: Any, *, where: str, fix: str) -> float:
    """A finite number above 0, or a one-line error naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{value!r} must be a positive number", where=where, fix=fix)
    return float(value)


def check_correction(value: Any, *, where: str) -> str:
    if value not in CORRECTIONS:
        raise ConfigError(f"correction {value!r} is not one of {', '.join(CORRECTIONS)}", where=where,
                          fix="use none (each method its own claim) or holm (over the run's methods)")
    return str(value)



def matched_settings(decision: Any, where: str) -> tuple[float, float | None, int]:
    """``(min_effect, max_kl or None for auto, random_draws)`` of a decision block; ``where``
    is the field prefix for errors (``exp.yaml: decision.``)."""
    min_effect = check_positive(decision.get("min_effect", DEFAULT_MIN_EFFECT), where=f"{where}min_effect",
                                fix="use a number of nats > 0, e.g. 0.5 (the default)")
    raw = decision.get("max_kl", "auto")
    max_kl = None if raw == "auto" else check_positive(
        raw, where=f"{where}max_kl",
        fix="use auto (the positive control's own KL per prompt) or a number of nats > 0, e.g. 0.25")
    draws = decision.get("random_draws", DEFAULT_RANDOM_DRAWS)
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ConfigError(f"`random_draws` must be an integer >= 1, got {draws!r}", where=f"{where}random_draws",
                          fix="use e.g. 16 (the default); 1 is a single draw per prompt")
    return min_effect, max_kl, draws


__all__ = ["CORRECTIONS", "DEFAULT_MIN_EFFECT", "DEFAULT_RANDOM_DRAWS", "check_correction", "check_level",
           "check_positive", "matched_settings"]
