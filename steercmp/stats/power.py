"""Power of the paired sign-flip test: what a battery of n prompts can and cannot show.

- :func:`min_p_value`: the smallest p the one-sided exact sign-flip test can return at n
  prompts, ``2**-n`` (all signs positive); if it is not below the level, no outcome can pass.
- :func:`prompts_to_reach`: the fewest prompts at which the level is reachable at all.
- :func:`minimum_detectable_effect`: the smallest mean difference detected with 80% power,
  simulated from the observed per-prompt spread: the observed differences are centred,
  resampled with replacement (n values), shifted by a candidate effect and tested.
- :func:`prompts_for_power`: how many prompts an observed effect needs for 80% power,
  simulated by resampling the observed differences at larger n.

The simulated test is the sign-flip test itself: exact over all sign patterns up to
:data:`EXACT_SIM_N` prompts, Monte Carlo over :data:`N_SIGNS` random patterns up to
:data:`MC_SIM_N`, and beyond that its normal approximation ``z = sum(d) / sqrt(sum(d**2))``
(the permutation distribution of a sum of signed values has variance ``sum(d**2)``). Every
draw comes from ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
from scipy.special import ndtr

POWER = 0.8
N_SIMS = 400
EXACT_SIM_N = 12
MC_SIM_N = 30
N_SIGNS = 2_000
MAX_PROMPTS = 4_096


def min_p_value(n: int) -> float:
    """Smallest one-sided p of the exact sign-flip test on ``n`` paired values (1.0 at n=0)."""
    return 2.0 ** -n if n > 0 else 1.0


def prompts_to_reach(level: float) -> int:
    """The fewest prompts for which the one-sided exact test can give ``p < level``."""
    return math.floor(math.log2(1.0 / level)) + 1


def _reject(samples: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """One-sided sign-flip test (H1: mean > 0) on each row of ``samples`` ``[S, n]``: rejects."""
    n = samples.shape[1]
    obs = samples.sum(axis=1)
    if n > MC_SIM_N:
        scale = np.sqrt((samples ** 2).sum(axis=1))
        z = np.divide(obs, scale, out=np.zeros_like(obs), where=scale > 0)
        return ndtr(-z) < level
    if n <= EXACT_SIM_N:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        adjustment = 0
    else:
        signs = rng.choice(np.array([-1.0, 1.0]), size=(N_SIGNS, n))
        adjustment = 1
    null = samples @ signs.T
    tol = np.abs(obs) * np.finfo(np.float64).eps * 100
    k = (null >= (obs - tol)[:, None]).sum(axis=1)
    p = (k + adjustment) / (signs.shape[0] + adjustment)
    return p < level


def _power(samples: np.ndarray, level: float, seed: int) -> float:
    return float(_reject(samples, level, np.random.default_rng(seed)).mean())


def _smallest_effect(base: np.ndarray, spread: float, level: float, power: float, seed: int) -> float | None:
    """Bisection for the smallest shift of ``base`` ``[S, n]`` (centred draws) reaching ``power``."""

    def ok(effect: float) -> bool:
        return _power(base + effect, level, seed) >= power

    lo, hi = 0.0, spread
    while not ok(hi):
        lo, hi = hi, hi * 2
        if hi > spread * 2 ** 20:
            return None
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
        if hi - lo <= 1e-3 * spread:
            break
    return float(hi)


def minimum_detectable_effect(diffs: Sequence[float] | np.ndarray, *, level: float = 0.05,
                              power: float = POWER, n_sims: int = N_SIMS, seed: int = 0) -> float | None:
    """The smallest mean difference the test detects with ``power`` at the observed n and
    spread, or ``None`` when no outcome can pass (``min_p_value(n) >= level``). 0 when the
    observed differences have no spread (any positive effect is then detected)."""
    d = np.asarray(diffs, dtype=np.float64)
    n = d.shape[0]
    if n == 0 or min_p_value(n) >= level:
        return None
    resid = d - d.mean()
    spread = float(np.sqrt((resid ** 2).mean()))
    if spread == 0.0:
        return 0.0
    rng = np.random.default_rng(seed)
    base = resid[rng.integers(0, n, (n_sims, n))]  # common random numbers for every candidate
    return _smallest_effect(base, spread, level, power, seed)


def prompts_for_power(diffs: Sequence[float] | np.ndarray, *, level: float = 0.05, power: float = POWER,
                      n_sims: int = N_SIMS, seed: int = 0, max_prompts: int = MAX_PROMPTS) -> int | None:
    """How many prompts the observed effect needs for ``power``: the observed per-prompt
    differences resampled at larger n. ``None`` when the observed mean is not positive (no
    number of prompts makes a null or negative effect pass) or more than ``max_prompts``."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.shape[0] == 0 or d.mean() <= 0:
        return None
    rng = np.random.default_rng(seed)

    def ok(n: int) -> bool:
        return _power(d[rng.integers(0, d.shape[0], (n_sims, n))], level, seed) >= power

    lo = prompts_to_reach(level) - 1
    hi = lo + 1
    while not ok(hi):
        lo, hi = hi, hi * 2
        if hi > max_prompts:
            return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def mde_in_sd(n: int, *, level: float = 0.05, power: float = POWER, n_sims: int = N_SIMS,
              seed: int = 0) -> float | None:
    """The minimum detectable effect in units of the per-prompt standard deviation, for normal
    differences (what ``steercmp plan`` predicts before any data exist); ``None`` when no
    outcome can pass at ``n``."""
    if n == 0 or min_p_value(n) >= level:
        return None
    base = np.random.default_rng(seed).standard_normal((n_sims, n))
    return _smallest_effect(base, 1.0, level, power, seed)
