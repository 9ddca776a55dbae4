"""Properties every scorer keeps, whatever the answer (hypothesis)."""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from modelsmith.loop.scoring.criteria import ExactCriterion, normalize_text
from modelsmith.loop.scoring.rubric import JudgeVerdict, Rubric, numeric_credit, score

# Shared 2-core machines: no per-example deadline.
quick = settings(deadline=None, max_examples=150)

CRITERIA: list[dict[str, Any]] = [
    {"type": "exact"},
    {"type": "exact", "strip_punctuation": True, "case_sensitive": True},
    {"type": "contains", "values": ["a", "42", "é"]},
    {"type": "contains", "values": ["a", "b"], "mode": "any"},
    {"type": "not_contains", "values": ["x", "y", "z"]},
    {"type": "regex", "pattern": r"^\d+$", "must_match": "full"},
    {"type": "json"},
    {"type": "json", "mode": "schema", "schema": {"type": "object", "required": ["a"]}},
    {"type": "json", "mode": "field_equals", "field": "a.b", "value": [1, {"c": None}]},
    {"type": "numeric", "value": 42, "abs_tol": 0.5, "partial_width": 10},
    {"type": "numeric", "field": "a", "value": -1e6, "rel_tol": 0.1},
    {"type": "choice", "labels": ["yes", "no", "42"], "value": "yes"},
    {"type": "length", "min_chars": 3, "max_chars": 40, "min_words": 1, "max_words": 6},
    {"type": "length", "max_chars": 0},
    {"type": "llm_judge", "engine": "judge"},
    {"type": "similarity", "metric": "fuzzy_match"},
    {"type": "similarity", "metric": "rouge_l", "value": "a 42 é", "pass_threshold": 0.3},
    {"type": "similarity", "metric": "bleu", "field": "a"},
    {"type": "label", "engine": "judge", "labels": ["yes", "no"], "passing_labels": ["yes"]},
    {"type": "rubric_judge", "engine": "judge", "criteria": [
        {"name": "a", "description": "x", "min": 0, "max": 10}], "pass_threshold": 0.5},
]
# Kinds whose passing credit can be below 1 (they pass at a threshold).
THRESHOLD_KINDS = ("llm_judge", "similarity", "rubric_judge")

answers = st.one_of(
    st.text(max_size=80),
    st.from_regex(r"\s*-?\d{1,7}(\.\d{1,3})?\s*", fullmatch=True),
    st.builds(
        lambda a: msgspec.json.encode({"a": a}).decode(), st.integers() | st.text(max_size=5)
    ),
    st.sampled_from(
        ["", "  ", "I cannot do that.", "yes", "No.", '{"a": {"b": [1, {"c": null}]}}']
    ),
)
weights = st.floats(min_value=0.01, max_value=100, allow_nan=False)
verdicts = st.one_of(
    st.none(),
    st.builds(lambda s: JudgeVerdict(score=s, raw=""), st.floats(min_value=0, max_value=1)),
    st.just(JudgeVerdict(score=None, raw="?", error="no SCORE line")),
)


def make_rubric(criteria: list[dict[str, Any]], pass_mark: float = 0.7) -> Rubric:
    return msgspec.convert({"criteria": criteria, "pass_mark": pass_mark}, Rubric, strict=True)


@quick
@given(
    picks=st.lists(st.tuples(st.sampled_from(CRITERIA), weights), min_size=1, max_size=6),
    answer=answers,
    reference=st.sampled_from(["42", "yes", "a"]),
    verdict=verdicts,
    pass_mark=st.floats(min_value=0, max_value=1),
)
def test_scores_stay_in_zero_to_one_and_the_mean_stays_within_its_criteria(
    picks: list[tuple[dict[str, Any], float]],
    answer: str,
    reference: str,
    verdict: JudgeVerdict | None,
    pass_mark: float,
) -> None:
    criteria = [{**criterion, "weight": weight} for criterion, weight in picks]
    if any(c["type"] == "choice" for c in criteria):
        reference = "yes"
    graded = make_rubric(criteria, pass_mark)
    judged = {i: verdict for i in graded.judge_indices() if verdict is not None}
    result = score(graded, answer, reference, judge_verdicts=judged)
    assert 0.0 <= result.score <= 1.0
    counted = [c.score for c in result.criteria if c.error_kind != "judge_failure"]
    for criterion in result.criteria:
        assert 0.0 <= criterion.score <= 1.0
    if counted:
        assert min(counted) <= result.score <= max(counted)
    assert result.judge_error == any(c.error_kind == "judge_failure" for c in result.criteria)
    assert result.passed == (not result.judge_error and result.score >= pass_mark)
    if counted and all(c.passed and c.type not in THRESHOLD_KINDS for c in result.criteria):
        assert result.score == 1.0


@quick
@given(
    text=st.text(max_size=60),
    case_sensitive=st.booleans(),
    strip=st.booleans(),
    collapse_whitespace=st.booleans(),
    strip_punctuation=st.booleans(),
)
def test_exact_is_reflexive_and_agrees_with_its_normalisation(
    text: str, case_sensitive: bool, strip: bool, collapse_whitespace: bool, strip_punctuation: bool
) -> None:
    options = {
        "case_sensitive": case_sensitive,
        "strip": strip,
        "collapse_whitespace": collapse_whitespace,
        "strip_punctuation": strip_punctuation,
    }
    graded = make_rubric([{"type": "exact", **options}])
    assert score(graded, text, text).score == 1.0
    normal = normalize_text(text, **options)
    assert normalize_text(normal, **options) == normal
    assert score(graded, normal, text).passed
    criterion = graded.criteria[0]
    assert isinstance(criterion, ExactCriterion)
    variant = f"  {text.upper()}\n" if strip and not case_sensitive else text
    assert score(graded, variant, text).passed == (criterion.normalize(variant) == normal)


@quick
@given(text=st.text(max_size=40))
def test_exact_with_defaults_ignores_case_and_surrounding_whitespace(text: str) -> None:
    graded = make_rubric([{"type": "exact"}])
    assert score(graded, f" \t{text.casefold()}  \n", text).passed


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
nonnegative = st.floats(min_value=0, max_value=1e3, allow_nan=False, allow_infinity=False)


@quick
@given(
    target=finite,
    first=finite,
    second=finite,
    abs_tol=nonnegative,
    rel_tol=st.floats(0, 1),
    partial_width=nonnegative,
)
def test_numeric_score_never_rises_as_the_answer_moves_away(
    target: float,
    first: float,
    second: float,
    abs_tol: float,
    rel_tol: float,
    partial_width: float,
) -> None:
    graded = make_rubric(
        [
            {
                "type": "numeric",
                "value": target,
                "abs_tol": abs_tol,
                "rel_tol": rel_tol,
                "partial_width": partial_width,
            }
        ]
    )
    near, far = sorted((first, second), key=lambda v: abs(v - target))
    near_score = score(graded, f"answer: {near!r}", None).score
    far_score = score(graded, f"answer: {far!r}", None).score
    assert 0.0 <= far_score <= near_score <= 1.0
    assert score(graded, repr(target), None).score == 1.0


@quick
@given(a=nonnegative, b=nonnegative, tolerance=nonnegative, partial_width=nonnegative)
def test_numeric_credit_is_monotone_in_the_error(
    a: float, b: float, tolerance: float, partial_width: float
) -> None:
    low, high = sorted((a, b))
    assert numeric_credit(low, tolerance, partial_width) >= numeric_credit(
        high, tolerance, partial_width
    )
