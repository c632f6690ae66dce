"""Numerical kernels on 1-D numpy arrays: bootstrap CI, sign-flip test, Holm.

These are the only places that draw random numbers. Every function takes an explicit ``seed``
and builds its own ``numpy.random.default_rng(seed)``, so results never depend on call order.
The draws follow SciPy's conventions exactly, which is what the tests check against.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Largest number of prompts for which the sign-flip test enumerates all 2**n sign patterns.
EXACT_MAX_N = 20
CI_LEVEL = 0.95


def bootstrap_mean_ci(
    values: Sequence[float] | np.ndarray,
    *,
    n_boot: int = 10_000,
    seed: int = 0,
    level: float = CI_LEVEL,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean, resampling the values (prompts) with replacement.

    Draws ``rng.integers(0, n, (n_boot, n))`` from ``default_rng(seed)`` and takes the
    ``(1-level)/2`` and ``(1+level)/2`` percentiles (linear interpolation) of the resampled
    means: identical to ``scipy.stats.bootstrap(..., method="percentile", vectorized=True)``
    with the same seed. Returns ``(nan, nan)`` for an empty sample; a single value gives a
    zero-width interval.
    """
    x = np.asarray(values, dtype=np.float64)
    n = x.shape[0]
    if n == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, (n_boot, n))
    means = x[idx].mean(axis=-1)
    tail = (1.0 - level) / 2.0
    lo = np.percentile(means, tail * 100.0)
    hi = np.percentile(means, (1.0 - tail) * 100.0)
    return (float(lo), float(hi))


def sign_flip_pvalue(
    diffs: Sequence[float] | np.ndarray,
    *,
    alternative: str = "two-sided",
    n_perm: int = 10_000,
    seed: int = 0,
    exact_max_n: int = EXACT_MAX_N,
) -> tuple[float, bool]:
    """Sign-flip permutation p-value for the mean of paired differences (H0: symmetric about 0).

    Up to ``exact_max_n`` values all ``2**n`` sign patterns are enumerated (exact test);
    beyond that ``n_perm`` random sign patterns are drawn from ``default_rng(seed)`` and the
    p-value is ``(k + 1) / (n_perm + 1)``. Ties are counted with SciPy's relative tolerance,
    so the result matches ``scipy.stats.permutation_test(..., permutation_type="samples")``.
    Returns ``(p_value, exact)``; ``(nan, True)`` for an empty sample.
    """
    d = np.asarray(diffs, dtype=np.float64)
    n = d.shape[0]
    if n == 0:
        return (float("nan"), True)
    observed = d.mean()
    if n <= exact_max_n:
        sums = np.zeros(1)
        for v in d:  # all 2**n signed sums, built by doubling
            sums = np.concatenate([sums + v, sums - v])
        null = sums / n
        adjustment = 0
        exact = True
    else:
        rng = np.random.default_rng(seed)
        signs = rng.choice(np.array([-1.0, 1.0]), size=(n_perm, n))
        null = (signs * d).mean(axis=1)
        adjustment = 1
        exact = False
    gamma = abs(np.finfo(np.float64).eps * 100 * observed)
    m = null.shape[0]
    p_less = ((null <= observed + gamma).sum() + adjustment) / (m + adjustment)
    p_greater = ((null >= observed - gamma).sum() + adjustment) / (m + adjustment)
    if alternative == "greater":
        p = p_greater
    elif alternative == "less":
        p = p_less
    elif alternative == "two-sided":
        p = min(2.0 * min(p_less, p_greater), 1.0)
    else:
        raise ValueError(f"alternative must be two-sided, greater or less, not {alternative!r}")
    return (float(p), exact)


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm step-down adjusted p-values; ``None``/NaN entries stay ``None`` and are not counted."""
    idx = [i for i, p in enumerate(pvalues) if p is not None and not np.isnan(p)]
    out: list[float | None] = [None] * len(pvalues)
    m = len(idx)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):  # type: ignore[arg-type,return-value]
        adj = min(1.0, (m - rank) * float(pvalues[i]))  # type: ignore[arg-type]
        running = max(running, adj)
        out[i] = running
    return out
