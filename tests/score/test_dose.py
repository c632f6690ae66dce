"""Dose matching against a synthetic side-effect curve with a known answer."""

import math

import pytest

from steercmp.score.dose import TOLERANCE, Arm, match_doses


def _power_law(scale):
    """KL = scale * (injected norm / site norm)^2, the small-dose shape of a real KL curve."""
    def evaluate(requests, arms):
        return [scale[a] * (m * arms[a].unit_norm / arms[a].site_norm) ** 2 for a, m in requests]
    return evaluate


@pytest.mark.parametrize("budget", [1e-4, 0.25, 3.0])
def test_matches_a_power_law_within_tolerance(budget):
    arms = [Arm(unit_norm=u, site_norm=100.0) for u in (0.5, 7.0, 300.0)]
    scale = [2.0, 40.0, 0.5]
    f = _power_law(scale)
    out = match_doses(arms, [budget] * 3, lambda req: f(req, arms))
    for a, m in enumerate(out):
        assert m.status == "matched", (a, m)
        assert budget / TOLERANCE <= m.point.kl <= budget * TOLERANCE
        r = math.sqrt(budget / scale[a])  # the exact answer
        assert abs(math.log(m.point.ratio / r)) < math.log(TOLERANCE)
        assert m.evals <= 9


def test_a_saturating_curve_is_unreachable_and_a_zero_budget_is_not_matched():
    arms = [Arm(1.0, 1.0), Arm(1.0, 1.0), Arm(0.0, 1.0)]
    out = match_doses(arms, [5.0, 0.0, 1.0], lambda req: [min(0.1 * m, 1.0) for _, m in req])
    assert out[0].status == "unreachable" and out[0].point.kl == pytest.approx(0.8)
    assert out[1].status == "no_budget" and out[1].point is None
    assert out[2].status == "zero_delta"


def test_one_batch_per_round():
    calls = []
    arms = [Arm(1.0, 10.0) for _ in range(5)]

    def evaluate(req):
        calls.append(len(req))
        return [(m / 10) ** 2 for _, m in req]

    match_doses(arms, [0.3] * 5, evaluate)
    assert calls[0] == 5 * 7 and len(calls) <= 3


def test_draws_of_one_group_start_from_the_first_draws_solution():
    """K random draws with similar curves: the followers are matched from the leader's dose in
    a point or two each, to the same tolerance, and a follower whose curve differs falls back
    to the grid and is still matched (or unreachable) on its own points."""
    arms = [Arm(1.0, 10.0) for _ in range(8)]
    scale = [1.0, 1.1, 0.9, 1.05, 0.95, 1.2, 1e-6, 300.0]  # draw 6 barely moves the KL, draw 7 a lot

    def evaluate(req):
        return [scale[a] * (m / 10) ** 2 for a, m in req]

    grouped = match_doses(arms, [0.3] * 8, evaluate, groups=[0] * 8)
    alone = match_doses(arms, [0.3] * 8, evaluate)
    for a in range(8):
        assert grouped[a].status == alone[a].status, a
        if grouped[a].status == "matched":
            assert 0.3 / TOLERANCE <= grouped[a].point.kl <= 0.3 * TOLERANCE
    assert grouped[6].status == "unreachable"  # like the grid search, never reaches the budget
    followers = sum(m.evals for m in grouped[1:6])
    assert followers <= 2 * 5 < sum(m.evals for m in alone[1:6])
