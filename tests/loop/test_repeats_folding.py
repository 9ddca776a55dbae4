"""Format versus substance per criterion kind, trials folded per scenario, and a resumed run
asking only for the (scenario, trial) pairs it has no result for."""

from __future__ import annotations

import msgspec
import pytest

from modelsmith.loop.eval.aggregate import answer_split, by_scenario, trial_stats
from modelsmith.loop.eval.run import pending_trials, score_batch
from modelsmith.loop.scoring.criteria import Rubric, counts_as_of
from modelsmith.loop.scoring.rubric import score
from modelsmith.loop.scoring.scenarios import Scenario

KINDS = [
    ({"type": "json", "mode": "valid"}, "format"),
    ({"type": "json", "mode": "schema", "schema": {"type": "object"}}, "format"),
    ({"type": "json", "mode": "field_equals", "field": "a", "value": 1}, "substance"),
    ({"type": "length", "max_chars": 10}, "format"),
    ({"type": "regex", "pattern": "^[0-9]+$"}, "format"),
    ({"type": "exact", "value": "4"}, "substance"),
    ({"type": "numeric", "value": 4}, "substance"),
    ({"type": "contains", "value": "4"}, "substance"),
    ({"type": "llm_judge", "engine": "judge"}, "substance"),
    ({"type": "choice", "labels": ["a", "b"], "value": "a"}, "both"),
    ({"type": "regex", "pattern": "^4$", "counts_as": "substance"}, "substance"),
    ({"type": "exact", "value": "4", "counts_as": "format"}, "format"),
]


def _rubric(*criteria: dict[str, object]) -> Rubric:
    return msgspec.convert({"criteria": list(criteria)}, Rubric)


@pytest.mark.parametrize(("criterion", "expected"), KINDS)
def test_each_criterion_kind_counts_as_format_or_substance_unless_it_says_otherwise(
    criterion: dict[str, object], expected: str
) -> None:
    assert counts_as_of(_rubric(criterion).criteria[0]) == expected


def test_a_valid_but_wrong_label_keeps_its_format_credit_and_loses_its_substance() -> None:
    rubric = _rubric({"type": "choice", "labels": ["low", "high"], "value": "low"},
                     {"type": "length", "max_chars": 5, "weight": 3.0})

    assert answer_split(rubric, score(rubric, "high", None))[:2] == (1.0, 0.0)
    fmt, substance, _ = answer_split(rubric, score(rubric, "banana", None))
    assert fmt == pytest.approx((0.0 + 3 * 5 / 6) / 4)  # not a label; 6 chars > 5: credit 5/6
    assert substance == 0.0
    assert answer_split(rubric, score(rubric, "low", None))[:2] == (1.0, 1.0)


def _scenario(sid: str) -> Scenario:
    return msgspec.convert({"id": sid, "set": "core", "domain": "d", "prompt": f"{sid}?",
                            "reference": "4", "rubric": {"criteria": [{"type": "exact"}]}}, Scenario)


def test_trials_fold_into_a_mean_score_a_majority_pass_and_a_flaky_list() -> None:
    a, b = _scenario("a"), _scenario("b")
    results = (score_batch([(a, "4", "stop", 1), (b, "4", "stop", 1)], 0)
               + score_batch([(a, "5", "stop", 1), (b, "4", "stop", 1)], 1)
               + score_batch([(a, "5", "stop", 1), (b, "4", "stop", 1)], 2))

    folded = {r.scenario_id: r for r in by_scenario(results)}
    stats = trial_stats(results)

    assert folded["a"].score == pytest.approx(1 / 3) and not folded["a"].passed
    assert folded["b"].score == 1.0 and folded["b"].passed
    assert (stats.repeats, stats.pass_at_k, stats.flaky) == (3, 0.5, ["a"])
    assert stats.pass_rates == {"a": pytest.approx(1 / 3, abs=1e-6), "b": 1.0}


def test_a_resumed_run_asks_only_for_the_trials_it_has_no_result_for() -> None:
    a, b = _scenario("a"), _scenario("b")
    done = (score_batch([(a, "4", "stop", 1), (b, "4", "stop", 1)], 0)
            + score_batch([(b, "4", "stop", 1)], 1))

    todo = pending_trials([a, b], done, 3)

    assert [[s.id for s in trial] for trial in todo] == [[], ["a"], ["a", "b"]]
