"""Dose matching on side effects: the scale at which a delta costs a given off-target KL.

Methods are compared at the SAME side-effect cost, not at the same raw alpha or norm: every
injected direction is scaled, per prompt, so that its off-target KL at the scoring slot equals
a budget (by default the positive control's own KL on that prompt). The budget uses no outcome,
so matching on it leaks nothing into the test.

The search is a batched root-finder on ``log KL`` against ``log r`` (``r`` = the injected norm
as a fraction of the residual's norm at the site): one log-spaced grid for every arm of a
prompt in one batch, then a few rounds of interpolation between the bracketing points (KL grows
roughly as a power of the norm, so log-log interpolation converges in one or two rounds). The
evaluated point nearest the budget is kept; it is ``matched`` when its KL lies within
:data:`TOLERANCE` of the budget. An arm whose KL never reaches the budget on the grid is
``unreachable`` and keeps its largest-KL point. Pure logic: ``evaluate`` does the forward passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import attrs

#: injected norm / residual norm at the site: 0.002 .. 8, a factor 4 apart
GRID: tuple[float, ...] = (0.002, 0.008, 0.03, 0.12, 0.5, 2.0, 8.0)
#: rounds of log-log interpolation after the grid
ROUNDS = 2
#: a point is matched when budget / TOLERANCE <= KL <= budget * TOLERANCE
TOLERANCE = 1.25
_FLOOR = 1e-12


@attrs.frozen
class Arm:
    """One direction to dose-match: ``unit_norm`` is the norm of the delta at multiplier 1 and
    ``site_norm`` the residual's norm at the site, so ``multiplier = r * site_norm / unit_norm``."""

    unit_norm: float
    site_norm: float

    def multiplier(self, ratio: float) -> float:
        return ratio * self.site_norm / self.unit_norm


@attrs.frozen
class Point:
    ratio: float
    multiplier: float
    kl: float
    index: int  # which evaluation of the batch (the caller keeps the scores by it)


@attrs.frozen
class Match:
    """The chosen point of one arm: ``status`` is matched, unreachable (never reaches the
    budget) or off_budget (evaluated, but not within the tolerance); ``evals`` how many points
    were evaluated."""

    point: Point | None
    status: str
    evals: int


def _log(x: float) -> float:
    return math.log(max(x, _FLOOR))


def within(kl: float, budget: float, tolerance: float = TOLERANCE) -> bool:
    return budget / tolerance <= kl <= budget * tolerance


def _next_ratio(points: Sequence[Point], budget: float) -> float | None:
    """The next ratio to try: log-log interpolation between the bracketing points, or a step
    beyond the grid's low end when even the smallest point costs more than the budget."""
    pts = sorted(points, key=lambda p: p.ratio)
    below = [p for p in pts if p.kl < budget]
    above = [p for p in pts if p.kl >= budget]
    if not above:
        return None  # unreachable: no larger dose is tried past the grid's top
    hi = min(above, key=lambda p: p.ratio)
    lo_cands = [p for p in below if p.ratio < hi.ratio]
    if not lo_cands:  # even the smallest dose is over budget: extrapolate down (KL ~ r^2)
        return hi.ratio * math.sqrt(max(budget, _FLOOR) / max(hi.kl, _FLOOR))
    lo = max(lo_cands, key=lambda p: p.ratio)
    x0, x1, y0, y1 = math.log(lo.ratio), math.log(hi.ratio), _log(lo.kl), _log(hi.kl)
    t = 0.5 if y1 == y0 else (math.log(budget) - y0) / (y1 - y0)
    return math.exp(x0 + min(max(t, 0.02), 0.98) * (x1 - x0))


def _refine(points: list[list[Point]], arms: Sequence[int], budgets: Sequence[float], rounds: int, tolerance: float,
            run: Callable[[list[tuple[int, float]]], None], ceiling: float | None = None) -> None:
    """Rounds of log-log interpolation for ``arms``; with ``ceiling``, an arm whose points all
    lie under the budget steps up (KL ~ r^2) no further than ``ceiling``."""
    for _ in range(rounds):
        todo = []
        for a in arms:
            best = min(points[a], key=lambda p: abs(_log(p.kl) - _log(budgets[a])))
            if within(best.kl, budgets[a], tolerance):
                continue
            r = _next_ratio(points[a], budgets[a])
            top = max(points[a], key=lambda p: p.ratio)
            if r is None and ceiling is not None and top.ratio < ceiling:
                r = min(ceiling, top.ratio * math.sqrt(budgets[a] / max(top.kl, _FLOOR)))
            if r is not None and all(abs(math.log(r / p.ratio)) > 1e-6 for p in points[a]):
                todo.append((a, r))
        run(todo)


def match_doses(arms: Sequence[Arm], budgets: Sequence[float],
                evaluate: Callable[[Sequence[tuple[int, float]]], Sequence[float]], *,
                grid: Sequence[float] = GRID, rounds: int = ROUNDS, tolerance: float = TOLERANCE,
                groups: Sequence[int | None] | None = None) -> list[Match]:
    """Match every arm to its budget. ``evaluate([(arm, multiplier), ...])`` runs one batch and
    returns each row's off-target KL; the returned points' ``index`` counts evaluations across
    all calls in order, so the caller can keep whatever else each evaluation produced.

    ``groups`` marks arms that are draws of one distribution (the K random directions of a
    control): the first arm of a group searches the grid, the others start at its solution
    and refine from there, and fall back to the grid only when that does not bracket the
    budget. Every arm is still matched on its own points, to the same tolerance."""
    points: list[list[Point]] = [[] for _ in arms]
    counter = 0

    def run(requests: list[tuple[int, float]]) -> None:
        nonlocal counter
        if not requests:
            return
        kls = evaluate([(a, arms[a].multiplier(r)) for a, r in requests])
        for (a, r), kl in zip(requests, kls, strict=True):
            points[a].append(Point(r, arms[a].multiplier(r), float(kl), counter))
            counter += 1

    live = [a for a, arm in enumerate(arms) if arm.unit_norm > 0 and budgets[a] > 0]
    group_of = list(groups) if groups is not None else [None] * len(arms)
    leaders: dict[int, int] = {}
    for a in live:
        if group_of[a] is not None:
            leaders.setdefault(group_of[a], a)  # type: ignore[arg-type]
    followers = [a for a in live if group_of[a] is not None and leaders[group_of[a]] != a]  # type: ignore[index]
    first = [a for a in live if a not in set(followers)]
    run([(a, r) for a in first for r in grid])
    _refine(points, first, budgets, rounds, tolerance, run)
    if followers:
        def start(a: int) -> float:
            lead = points[leaders[group_of[a]]]  # type: ignore[index]
            return min(lead, key=lambda p: abs(_log(p.kl) - _log(budgets[a]))).ratio

        run([(a, start(a)) for a in followers])
        _refine(points, followers, budgets, rounds, tolerance, run, ceiling=max(grid))
        stray = [a for a in followers if not within(
            min(points[a], key=lambda p: abs(_log(p.kl) - _log(budgets[a]))).kl, budgets[a], tolerance)]
        run([(a, r) for a in stray for r in grid if all(abs(math.log(r / p.ratio)) > 1e-6 for p in points[a])])
        _refine(points, stray, budgets, rounds, tolerance, run)
    out = []
    for a in range(len(arms)):
        if a not in live:
            out.append(Match(None, "no_budget" if budgets[a] <= 0 else "zero_delta", 0))
            continue
        pts = points[a]
        if all(p.kl < budgets[a] / tolerance for p in pts):
            out.append(Match(max(pts, key=lambda p: p.kl), "unreachable", len(pts)))
            continue
        best = min(pts, key=lambda p: abs(_log(p.kl) - _log(budgets[a])))
        out.append(Match(best, "matched" if within(best.kl, budgets[a], tolerance) else "off_budget", len(pts)))
    return out

#: the side-effect budget where a run has no positive control and ``decision.max_kl`` is auto:
#: the median off-target KL of a real activation patch (the counterfactual couplet's residual)
#: at the embedded default's site, measured with no outcome in view (issue 19's independent
#: check: 0.25 nats over the 40 rhyme40 prompts). A run with a positive control uses its own.
DEFAULT_MAX_KL = 0.25
