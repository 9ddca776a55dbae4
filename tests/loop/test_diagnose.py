"""Diagnose groups an eval's failures into ranked patterns (pure, on synthetic results)."""

from __future__ import annotations

from modelsmith.loop.eval.diagnose import EXAMPLES_PER_PATTERN, classify, diagnose
from modelsmith.rpc.schema.evals import CriterionOutcome, ScenarioResult


def outcome(name: str, type: str, passed: bool, *, error_kind: str | None = None, weight: float = 1.0) -> CriterionOutcome:
    return CriterionOutcome(name=name, type=type, weight=weight, score=1.0 if passed else 0.0,
                            passed=passed, detail=f"{name} {'ok' if passed else 'failed'}",
                            error_kind=error_kind)


def result(
    scenario_id: str, *, response: str = "answer", score: float = 0.0, passed: bool = False,
    criteria: list[CriterionOutcome] | None = None, tags: list[str] | None = None,
    judge_error: bool = False, weight: float = 1.0, set: str = "core",
) -> ScenarioResult:
    return ScenarioResult(
        scenario_id=scenario_id, set=set, domain="adtech", tags=tags or [], weight=weight,
        scenario_hash="h", prompt="p", response=response, reference="mid", score=score,
        passed=passed, pass_mark=0.75, judge_error=judge_error, criteria=criteria or [],
        finish_reason="stop", completion_tokens=1,
    )


def test_failures_group_by_criterion_and_kind_ranked_by_lost_score() -> None:
    results = [
        result("a", criteria=[outcome("bucket", "choice", False, error_kind="wrong_value")], tags=["mid"]),
        result("b", criteria=[outcome("bucket", "choice", False, error_kind="wrong_value")], tags=["mid"]),
        result("c", score=0.5, criteria=[outcome("fmt", "json", False, error_kind="wrong_format")], tags=["high"]),
        result("d", score=1.0, passed=True, criteria=[outcome("bucket", "choice", True)]),
    ]

    found = diagnose("rtb", "t", results)

    assert (found.scenarios, found.failed) == (4, 3)
    assert [p.pattern for p in found.patterns] == ["choice/wrong_value", "json/wrong_format"]
    top = found.patterns[0]
    assert top.count == 2 and top.scenario_ids == ["a", "b"] and top.lost_score == 2.0
    assert top.tags == {"mid": 2}
    assert found.by_tag == {"mid": 2, "high": 1}
    assert top.examples[0].response == "answer" and top.examples[0].reference == "mid"


def test_empty_answers_and_judge_failures_form_their_own_patterns() -> None:
    empty = result("e", response="  ", criteria=[outcome("bucket", "choice", False)])
    judged = result("j", judge_error=True, criteria=[outcome("judge", "llm_judge", False)])

    assert classify(empty) == [("any", "refusal_or_empty", "empty answer or refusal")]
    assert classify(judged)[0][:2] == ("llm_judge", "judge_failure")
    assert {p.kind for p in diagnose("rtb", "t", [empty, judged]).patterns} == {"refusal_or_empty", "judge_failure"}


def test_a_scenario_failing_two_criteria_splits_its_lost_score_between_them() -> None:
    both = result("x", criteria=[outcome("bucket", "choice", False), outcome("len", "length", False)])

    found = diagnose("rtb", "t", [both])

    assert sorted(p.pattern for p in found.patterns) == ["choice/wrong_value", "length/wrong_value"]
    assert [p.lost_score for p in found.patterns] == [0.5, 0.5]


def test_a_pattern_keeps_only_a_few_examples_and_near_misses_are_counted() -> None:
    many = [result(f"s{i}", criteria=[outcome("bucket", "choice", False)]) for i in range(10)]
    near = result("n", score=0.76, passed=True, criteria=[outcome("bucket", "choice", True)])

    found = diagnose("rtb", "t", [*many, near], near_miss_margin=0.05)

    assert found.patterns[0].count == 10
    assert len(found.patterns[0].examples) == EXAMPLES_PER_PATTERN
    assert found.near_misses == 1


def test_no_failures_give_no_patterns() -> None:
    assert diagnose("rtb", "t", [result("ok", score=1.0, passed=True)]).patterns == []
