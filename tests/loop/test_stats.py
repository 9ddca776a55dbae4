"""Eval statistics against hand-computed values: the bootstrap interval, McNemar, the sign test."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelsmith.loop.eval.stats import (
    bootstrap_ci95,
    mcnemar_p,
    paired_test,
    resampled_means,
    sign_p,
    significantly_worse,
)


def test_each_resample_is_the_weighted_mean_of_the_scenarios_it_drew() -> None:
    scores, weights = [0.0, 0.5, 1.0], [1.0, 1.0, 2.0]
    rows = np.array([[0, 0, 0], [0, 1, 2], [2, 2, 1], [1, 1, 1]])

    means = resampled_means(scores, weights, rows)

    # (0+0+0)/3, (0 + 0.5 + 2*1)/4, (2*1 + 2*1 + 0.5)/5, 0.5
    assert means.tolist() == pytest.approx([0.0, 0.625, 0.9, 0.5])


def test_two_scenarios_one_passed_give_the_whole_range() -> None:
    # The resampled mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4: both tails hold 25%.
    assert bootstrap_ci95([0.0, 1.0], [1.0, 1.0]) == [0.0, 1.0]


def test_scenarios_that_all_score_the_same_have_no_spread() -> None:
    assert bootstrap_ci95([0.7] * 5, [1.0, 2.0, 3.0, 1.0, 1.0]) == [0.7, 0.7]
    assert bootstrap_ci95([], []) is None


def test_a_large_set_matches_the_normal_approximation() -> None:
    # 400 scenarios, half passed: standard error sqrt(0.25 / 400) = 0.025, so +-1.96 * 0.025.
    low, high = bootstrap_ci95([1.0, 0.0] * 200, [1.0] * 400, resamples=4000)
    assert low == pytest.approx(0.5 - 0.049, abs=0.006)
    assert high == pytest.approx(0.5 + 0.049, abs=0.006)


def test_the_interval_is_seeded() -> None:
    scores = [0.1, 0.9, 0.4, 0.7, 0.3, 1.0, 0.0]
    weights = [1.0] * 7
    assert bootstrap_ci95(scores, weights, seed=3) == bootstrap_ci95(scores, weights, seed=3)


def test_mcnemar_is_the_exact_binomial_tail_on_the_discordant_pairs() -> None:
    assert mcnemar_p(1, 6) == pytest.approx(2 * (1 + 7) / 128)  # 0.125
    assert mcnemar_p(0, 5) == pytest.approx(2 / 32)  # 0.0625
    assert mcnemar_p(2, 10) == pytest.approx(2 * (1 + 12 + 66) / 4096)  # 0.0386
    assert mcnemar_p(3, 3) == 1.0
    assert mcnemar_p(0, 0) == 1.0


def test_the_sign_test_drops_ties() -> None:
    # One up, four down, one tie: 2 * P(X <= 1), X ~ Bin(5, 1/2) = 2 * 6/32.
    assert sign_p([0.1, -0.2, -0.3, 0.0, -0.1, -0.05]) == pytest.approx(0.375)
    assert sign_p([0.0, 0.0]) == 1.0


def test_a_paired_test_counts_flips_and_weights_the_mean_delta() -> None:
    pairs = [(0.2, False, 0.9, True, 2.0), (0.8, True, 0.6, False, 1.0), (1.0, True, 1.0, True, 1.0)]

    test = paired_test(pairs)

    assert (test.n, test.fixed, test.regressed, test.improved, test.worsened) == (3, 1, 1, 1, 1)
    assert test.mean_delta == pytest.approx((2 * 0.7 - 0.2 + 0.0) / 4)  # 0.3
    assert test.mcnemar_p == 1.0 and test.sign_p == 1.0
    low, high = test.delta_ci95
    assert low <= test.mean_delta <= high


def test_seven_regressions_and_no_fix_are_significant_at_five_percent() -> None:
    pairs = [(1.0, True, 0.0, False, 1.0)] * 7 + [(1.0, True, 1.0, True, 1.0)] * 20

    test = paired_test(pairs)

    assert test.mcnemar_p == pytest.approx(2 / 128)
    assert significantly_worse(test, 0.05)
    assert not significantly_worse(test, 0.01)


def test_significant_improvement_is_not_a_regression() -> None:
    test = paired_test([(0.0, False, 1.0, True, 1.0)] * 7)
    assert test.mcnemar_p < 0.05 and not significantly_worse(test, 0.05)


scored = st.lists(
    st.tuples(st.floats(0.0, 1.0), st.floats(0.1, 5.0)), min_size=1, max_size=25)


@settings(max_examples=60, deadline=None)
@given(scored)
def test_the_interval_covers_the_point_and_stays_within_the_scores(items: list[tuple[float, float]]) -> None:
    scores, weights = [s for s, _ in items], [w for _, w in items]
    point = sum(s * w for s, w in items) / sum(weights)

    low, high = bootstrap_ci95(scores, weights, resamples=500)  # type: ignore[misc]

    assert low <= round(point, 6) <= high
    assert min(scores) - 1e-6 <= low and high <= max(scores) + 1e-6


@settings(max_examples=40, deadline=None)
@given(scored)
def test_four_times_the_scenarios_give_a_narrower_interval(items: list[tuple[float, float]]) -> None:
    scores, weights = [s for s, _ in items], [w for _, w in items]
    low, high = bootstrap_ci95(scores, weights, resamples=1000)  # type: ignore[misc]
    low4, high4 = bootstrap_ci95(scores * 4, weights * 4, resamples=1000)  # type: ignore[misc]

    if high - low > 0:
        assert high4 - low4 < high - low
    else:
        assert high4 - low4 == 0
