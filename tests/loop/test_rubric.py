"""Rubric scoring: every criterion type, refusals, judges, batch scoring."""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import pytest

from modelsmith.errors import ValidationError
from modelsmith.loop.scoring.answers import extract_json, first_number, is_refusal_or_empty
from modelsmith.loop.scoring.criteria import DEFAULT_JUDGE_TEMPLATE
from modelsmith.loop.scoring.rubric import (
    ERROR_KINDS,
    CriterionResult,
    JudgeVerdict,
    LlmJudgeCriterion,
    Rubric,
    RubricScore,
    judge_prompt,
    parse_judge_reply,
    score,
    score_with_judge,
)


def rubric(*criteria: dict[str, Any], pass_mark: float = 0.7) -> Rubric:
    return msgspec.convert(
        {"criteria": list(criteria), "pass_mark": pass_mark}, Rubric, strict=True
    )


def one(criterion: dict[str, Any], response: str, reference: str | None = None) -> CriterionResult:
    return score(rubric(criterion), response, reference).criteria[0]


def bad_criterion(criterion: dict[str, Any]) -> msgspec.ValidationError:
    with pytest.raises(msgspec.ValidationError) as info:
        rubric(criterion)
    return info.value


# ------------------------------------------------------------------------------- exact


def test_exact_ignores_case_and_extra_whitespace_by_default() -> None:
    result = one({"type": "exact"}, "  Paris \n", "paris")
    assert result.score == 1.0 and result.passed and result.error_kind is None
    assert one({"type": "exact", "value": "New  York"}, "new york").passed


def test_exact_fails_a_different_answer_as_a_wrong_value() -> None:
    result = one({"type": "exact"}, "Lyon", "Paris")
    assert result.score == 0.0 and not result.passed and result.error_kind == "wrong_value"


def test_exact_options_control_case_and_punctuation() -> None:
    assert not one({"type": "exact", "case_sensitive": True}, "paris", "Paris").passed
    assert not one({"type": "exact"}, "Paris.", "Paris").passed
    assert one({"type": "exact", "strip_punctuation": True}, "Paris!", "Paris").passed
    assert not one(
        {"type": "exact", "strip": False, "collapse_whitespace": False}, " a", "a"
    ).passed


# ------------------------------------------------------------------------------- contains


def test_contains_gives_partial_credit_for_some_of_several_needles() -> None:
    criterion = {"type": "contains", "values": ["alpha", "beta", "gamma", "delta"]}
    assert one(criterion, "ALPHA beta gamma delta").passed
    partial = one(criterion, "alpha and beta")
    assert partial.score == 0.5 and not partial.passed and partial.error_kind == "missing_content"


def test_contains_any_mode_and_case_sensitivity() -> None:
    assert one({"type": "contains", "values": ["x", "y"], "mode": "any"}, "only y").score == 1.0
    assert not one({"type": "contains", "value": "Ok", "case_sensitive": True}, "ok").passed


def test_contains_without_a_needle_looks_for_the_reference() -> None:
    assert one({"type": "contains"}, "The answer is 42.", "42").passed
    assert not one({"type": "contains"}, "The answer is 41.", "42").passed


def test_not_contains_fails_on_forbidden_content() -> None:
    criterion = {"type": "not_contains", "values": ["password", "secret"]}
    assert one(criterion, "all clear").passed
    result = one(criterion, "the Secret is out")
    assert result.score == 0.5 and result.error_kind == "forbidden_content"


def test_not_contains_needs_a_needle() -> None:
    assert isinstance(bad_criterion({"type": "not_contains"}).__cause__, ValueError)


# ------------------------------------------------------------------------------- regex


def test_regex_searches_by_default_and_can_require_a_full_match() -> None:
    assert one({"type": "regex", "pattern": r"\d{3}"}, "code 123 ok").passed
    assert not one({"type": "regex", "pattern": r"\d{3}", "must_match": "full"}, "code 123").passed
    assert one({"type": "regex", "pattern": r"\d{3}", "must_match": "full"}, " 123\n").passed


def test_regex_failure_is_a_wrong_format_and_flags_apply() -> None:
    result = one({"type": "regex", "pattern": "^yes$"}, "YES")
    assert not result.passed and result.error_kind == "wrong_format"
    assert one({"type": "regex", "pattern": "^yes$", "ignore_case": True}, "YES").passed
    assert one({"type": "regex", "pattern": "^b$", "multiline": True}, "a\nb").passed
    assert one({"type": "regex", "pattern": "a.b", "dotall": True}, "a\nb").passed


# ------------------------------------------------------------------------------- json


def test_json_valid_accepts_an_object_inside_prose_or_a_code_fence() -> None:
    assert one({"type": "json"}, '{"a": 1}').passed
    assert one({"type": "json"}, 'Sure! ```json\n{"a": {"b": [1, 2]}}\n``` done').passed
    assert not one({"type": "json", "allow_surrounding_text": False}, 'x {"a": 1}').passed
    result = one({"type": "json"}, "no json {here")
    assert not result.passed and result.error_kind == "wrong_format"


def test_json_schema_mode_checks_the_schema() -> None:
    schema = {
        "type": "object",
        "required": ["price"],
        "properties": {"price": {"type": "number"}},
    }
    criterion = {"type": "json", "mode": "schema", "schema": schema}
    assert one(criterion, '{"price": 3.5}').passed
    result = one(criterion, '{"price": "cheap"}')
    assert not result.passed and result.error_kind == "wrong_format"


def test_json_field_equals_follows_a_dotted_path() -> None:
    criterion = {"type": "json", "mode": "field_equals", "field": "bid.price", "value": 10}
    assert one(criterion, 'Here: {"bid": {"price": 10.0}}').passed
    wrong = one(criterion, '{"bid": {"price": 11}}')
    assert wrong.error_kind == "wrong_value" and not wrong.passed
    assert one(criterion, '{"bid": {}}').error_kind == "missing_content"
    listed = {"type": "json", "mode": "field_equals", "field": "items.1", "value": "b"}
    assert one(listed, '{"items": ["a", "b"]}').passed


def test_json_field_equals_does_not_confuse_true_with_one() -> None:
    criterion = {"type": "json", "mode": "field_equals", "field": "ok", "value": True}
    assert one(criterion, '{"ok": true}').passed
    assert not one(criterion, '{"ok": 1}').passed


def test_json_options_are_checked_at_load_time() -> None:
    assert bad_criterion({"type": "json", "mode": "schema"}).__cause__ is not None
    assert bad_criterion({"type": "json", "mode": "field_equals", "field": "a"}).__cause__
    assert bad_criterion({"type": "json", "field": "a"}).__cause__ is not None


def test_extract_json_takes_the_first_object_after_false_starts() -> None:
    assert extract_json('use {braces} like {"a": 1} and {"b": 2}') == (True, {"a": 1})
    assert extract_json("[1, 2]") == (True, [1, 2])
    assert extract_json("nothing") == (False, None)


def test_absurdly_nested_json_is_a_format_failure_not_a_crash() -> None:
    for answer in ("[" * 100_000, "x " + '{"a":' * 100_000):
        assert one({"type": "json"}, answer).error_kind == "wrong_format"


# ------------------------------------------------------------------------------- numeric


def test_numeric_reads_the_first_number_and_compares_with_tolerance() -> None:
    criterion = {"type": "numeric", "abs_tol": 0.01}
    assert one(criterion, "It is 3.14159 roughly", "3.14").passed
    result = one(criterion, "about 3.2, or 7", "3.14")
    assert result.score == 0.0 and result.error_kind == "out_of_tolerance"


def test_numeric_gives_linear_partial_credit_outside_tolerance() -> None:
    criterion = {"type": "numeric", "value": 100, "abs_tol": 1, "partial_width": 10}
    assert one(criterion, "101").score == 1.0
    assert one(criterion, "106").score == pytest.approx(0.5)
    assert one(criterion, "94").score == pytest.approx(0.5)
    assert one(criterion, "120").score == 0.0


def test_numeric_relative_tolerance_scales_with_the_target() -> None:
    criterion = {"type": "numeric", "value": 1000, "rel_tol": 0.01}
    assert one(criterion, "1,009").passed and not one(criterion, "1,011").passed


def test_numeric_can_read_the_last_number_or_a_json_field() -> None:
    assert one({"type": "numeric", "occurrence": "last"}, "2 plus 2 is 4", "4").passed
    field = {"type": "numeric", "field": "bid.price", "value": 9.5}
    assert one(field, 'Offer: {"bid": {"price": "9.5"}}').passed
    result = one(field, '{"bid": {"price": "n/a"}}')
    assert not result.passed and result.error_kind == "wrong_format"


def test_numeric_without_a_number_is_a_wrong_format() -> None:
    assert one({"type": "numeric", "value": 1}, "no idea, sorry").error_kind == "wrong_format"


def test_first_number_reads_signs_and_thousands_separators() -> None:
    assert first_number("x = -3.5e2 then 4") == -350.0
    assert first_number("range 3-5", occurrence="last") == 5.0
    assert first_number("total: $1,234.50") == 1234.5
    assert first_number("1,2,3") == 1.0
    assert first_number("none") is None


# ------------------------------------------------------------------------------- choice


def test_choice_accepts_the_right_label_in_any_case_with_edge_punctuation() -> None:
    criterion = {"type": "choice", "labels": ["A", "B", "C"]}
    assert one(criterion, " b. ", "B").passed
    wrong = one(criterion, "C", "B")
    assert wrong.error_kind == "wrong_value" and wrong.score == 0.0
    off_list = one(criterion, "D", "B")
    assert off_list.error_kind == "wrong_format" and off_list.score == 0.0


def test_choice_value_must_be_one_of_the_labels() -> None:
    assert bad_criterion({"type": "choice", "labels": ["yes", "no"], "value": "maybe"}).__cause__
    assert bad_criterion({"type": "choice", "labels": ["yes", "Yes"]}).__cause__


# ------------------------------------------------------------------------------- length


def test_length_bounds_give_proportional_credit() -> None:
    assert one({"type": "length", "max_words": 3}, "one two three").passed
    too_long = one({"type": "length", "max_words": 2}, "one two three four")
    assert too_long.error_kind == "too_long" and too_long.score == 0.5
    too_short = one({"type": "length", "min_chars": 10}, "hello")
    assert too_short.error_kind == "too_short" and too_short.score == 0.5


def test_length_needs_a_bound_and_an_ordered_range() -> None:
    assert bad_criterion({"type": "length"}).__cause__ is not None
    assert bad_criterion({"type": "length", "min_words": 5, "max_words": 2}).__cause__


# ------------------------------------------------------------------------------- rubric


def test_the_score_is_the_weighted_mean_and_passes_at_the_pass_mark() -> None:
    graded = rubric(
        {"type": "exact", "value": "4", "weight": 3},
        {"type": "length", "max_chars": 0, "weight": 1, "name": "silent"},
        pass_mark=0.75,
    )
    result = score(graded, "4", None)
    assert result.score == pytest.approx(0.75) and result.passed
    assert [c.name for c in result.criteria] == ["exact", "silent"]
    assert [c.type for c in result.criteria] == ["exact", "length"]
    assert not score(graded, "5", None).passed


def test_an_empty_answer_or_a_refusal_fails_as_refusal_or_empty() -> None:
    graded = rubric({"type": "exact", "value": "4"}, {"type": "not_contains", "value": "x"})
    for answer in (
        "",
        "   \n",
        "I can't help with that.",
        "Sorry, but I cannot do that",
        "As an AI, I have no opinion.",
    ):
        result = score(graded, answer, None)
        assert result.criteria[0].error_kind == "refusal_or_empty", answer
        assert result.criteria[1].passed and result.criteria[1].error_kind is None
    assert not is_refusal_or_empty("I can tell you: 4")


def test_a_missing_reference_is_a_validation_error_not_a_zero() -> None:
    with pytest.raises(ValidationError):
        score(rubric({"type": "exact"}), "4", None)


def test_results_encode_to_json_with_only_documented_error_kinds() -> None:
    result = score(rubric({"type": "numeric", "value": 2}), "3", None)
    decoded = msgspec.json.decode(msgspec.json.encode(result), type=RubricScore)
    assert decoded == result
    assert decoded.criteria[0].error_kind in ERROR_KINDS


# ------------------------------------------------------------------------------- judges


JUDGED = {
    "type": "llm_judge",
    "engine": "judge",
    "template": "Q {prompt} A {response} R {reference}",
}


def test_parse_judge_reply_reads_one_score_line_on_its_scale() -> None:
    assert parse_judge_reply("Good answer.\nSCORE: 7", scale=10).score == pytest.approx(0.7)
    assert parse_judge_reply("score: 0.25\n", scale=1).score == 0.25
    assert parse_judge_reply("SCORE: 1\nSCORE: 1", scale=1).score == 1.0


@pytest.mark.parametrize(
    "reply",
    [
        "",
        "Looks right to me",
        "SCORE: 11",
        "SCORE: 7/10",
        "SCORE: high",
        "SCORE: 3\nSCORE: 4",
        "final SCORE: 5",
        "SCORE: -1",
    ],
)
def test_parse_judge_reply_refuses_anything_else(reply: str) -> None:
    verdict = parse_judge_reply(reply, scale=10)
    assert verdict.score is None and verdict.error is not None and verdict.raw == reply


def test_judge_prompt_fills_the_template() -> None:
    criterion = rubric(JUDGED).criteria[0]
    assert isinstance(criterion, LlmJudgeCriterion)
    assert judge_prompt(criterion, "2+2?", "4", "4") == "Q 2+2? A 4 R 4"
    default = LlmJudgeCriterion(engine="j")
    assert default.template == DEFAULT_JUDGE_TEMPLATE
    assert "{reference}" not in judge_prompt(default, "q", "a", None)


def test_judge_templates_may_only_use_known_placeholders() -> None:
    bad_criterion({"type": "llm_judge", "engine": "j", "template": "{response.__class__}"})
    bad_criterion({"type": "llm_judge", "engine": "j", "template": "no answer slot"})
    bad_criterion({"type": "llm_judge", "engine": "j", "template": "{response} {"})


def test_a_judge_verdict_scores_the_criterion() -> None:
    graded = rubric({"type": "exact", "value": "4"}, JUDGED, pass_mark=0.5)
    result = score(graded, "4", "4", judge_verdicts={1: JudgeVerdict(score=0.6, raw="SCORE: 0.6")})
    assert result.criteria[1].score == 0.6 and result.criteria[1].passed
    assert result.score == pytest.approx(0.8) and result.passed and not result.judge_error


def test_a_missing_or_failed_verdict_is_a_judge_failure_left_out_of_the_mean() -> None:
    graded = rubric({"type": "exact", "value": "4"}, JUDGED)
    for verdicts in (None, {1: JudgeVerdict(score=None, raw="meh", error="no SCORE line")}):
        result = score(graded, "4", "4", judge_verdicts=verdicts)
        assert result.criteria[1].error_kind == "judge_failure"
        assert result.judge_error and not result.passed
        assert result.score == 1.0  # the model is not charged for the judge's failure


async def test_score_with_judge_asks_the_engine_for_each_judge_criterion() -> None:
    graded = rubric(JUDGED, {**JUDGED, "engine": "other", "template": "{response}"})
    asked: list[str] = []

    async def judge(text: str) -> str:
        asked.append(text)
        return "reasoning\nSCORE: 1"

    with anyio.fail_after(10):
        result = await score_with_judge(graded, "4", "4", prompt_text="2+2?", judge=judge)
    assert sorted(asked) == ["4", "Q 2+2? A 4 R 4"]
    assert result.passed and result.score == 1.0


async def test_score_with_judge_turns_engine_errors_and_bad_replies_into_judge_failures() -> None:
    graded = rubric(JUDGED, {**JUDGED, "engine": "chatty"}, {**JUDGED, "engine": "absent"})

    async def broken(text: str) -> str:
        raise ConnectionError("engine down")

    async def chatty(text: str) -> str:
        return "I think it is fine."

    with anyio.fail_after(10):
        result = await score_with_judge(
            graded, "4", "4", prompt_text="q", judge={"judge": broken, "chatty": chatty}
        )
    assert [c.error_kind for c in result.criteria] == ["judge_failure"] * 3
    assert result.judge_error and not result.passed
