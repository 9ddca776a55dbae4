"""Judge agreement figures against values worked out by hand (and published examples)."""

from __future__ import annotations

import pytest

from modelsmith.loop.eval.judge_stats import agreement, cohen_kappa, consistency, spearman


def test_kappa_matches_the_textbook_example() -> None:
    # Wikipedia's "Cohen's kappa" example: 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no -> 0.4.
    a = [True] * 25 + [False] * 25
    b = [True] * 20 + [False] * 5 + [True] * 10 + [False] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)


def test_kappa_is_undefined_when_both_raters_say_one_label_throughout() -> None:
    assert cohen_kappa([True] * 5, [True] * 5) is None
    assert cohen_kappa([True, False], [False, True]) == pytest.approx(-1.0)


def test_spearman_matches_the_textbook_example() -> None:
    # Wikipedia's "Spearman's rank correlation" example (IQ vs hours of TV): rho = -29/165.
    iq = [106, 100, 86, 101, 99, 103, 97, 113, 112, 110]
    tv = [7, 27, 2, 50, 28, 29, 20, 12, 6, 17]
    assert spearman(iq, tv) == pytest.approx(-29 / 165)
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


def test_a_judge_that_agrees_exactly_scores_one_everywhere() -> None:
    human = [0, 1, 2, 3, 4, 5, 5, 0]
    result = agreement(human, [float(h) for h in human], scale=5, pass_mark=0.6, resamples=200)
    assert result.exact_rate == 1.0 and result.within_one_rate == 1.0
    assert result.kappa == 1.0 and result.spearman == 1.0
    assert result.exact_ci95 == [1.0, 1.0] and result.answered == 8


def test_a_judge_failure_counts_against_the_judge_never_for_it() -> None:
    human = [5, 5, 0, 0]
    # The judge gets the two it answers right and fails on the other two.
    result = agreement(human, [5.0, None, 0.0, None], scale=5, pass_mark=0.6, resamples=200)
    assert result.answered == 2
    assert result.exact_rate == 0.5 and result.within_one_rate == 0.5
    # Failures read as the opposite label: 2 of 4 agree, both raters 50% pass -> kappa 0.
    assert result.kappa == pytest.approx(0.0)
    assert result.spearman is None  # two answered examples cannot be ranked


def test_within_one_and_exact_differ_on_near_misses() -> None:
    result = agreement([3, 3, 3, 0], [4.0, 2.0, 3.0, 3.0], scale=5, pass_mark=0.5, resamples=200)
    assert result.exact_rate == 0.25 and result.within_one_rate == 0.75
    assert result.exact_ci95 is not None and result.exact_ci95[0] <= 0.25 <= result.exact_ci95[1]


def test_intervals_contain_the_point_and_are_seeded() -> None:
    human = [0, 1, 2, 3, 4, 5] * 4
    judge = [0.0, 2.0, 2.0, 3.0, 5.0, 4.0] * 4
    one = agreement(human, judge, scale=5, pass_mark=0.6, resamples=300, seed=7)
    two = agreement(human, judge, scale=5, pass_mark=0.6, resamples=300, seed=7)
    assert one == two
    assert one.kappa is not None and one.kappa_ci95 is not None
    assert one.kappa_ci95[0] <= one.kappa <= one.kappa_ci95[1]
    assert one.spearman is not None and one.spearman_ci95 is not None
    assert one.spearman_ci95[0] <= one.spearman <= one.spearman_ci95[1] <= 1.0


def test_consistency_reports_per_example_spread_and_failures() -> None:
    mean, largest, agreeing, failures = consistency([[3, 3, 3], [1, 4, None], [None, None, 2]])
    assert (mean, largest, agreeing, failures) == (1.5, 3.0, 0.5, 3)
    assert consistency([[None], [None]]) == (None, None, None, 2)
