"""Properties of the new criteria, whatever the answer or reply (hypothesis): similarity scores
stay in 0..1 and are 1 for an answer equal to its reference; a structured judge reply is either
a score in 0..1 or a judge failure, never an exception; a formula either evaluates to a finite
number or fails with FormulaError, and a rubric with one never scores outside 0..1."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelsmith.loop.scoring.criteria import LabelCriterion, Rubric, RubricJudgeCriterion
from modelsmith.loop.scoring.formula import FormulaError, evaluate_formula
from modelsmith.loop.scoring.judge_replies import read_label_reply, read_rubric_reply
from modelsmith.loop.scoring.rubric import score
from modelsmith.loop.scoring.similarity import METRICS, similarity

quick = settings(deadline=None, max_examples=120)
words = st.lists(st.sampled_from(["the", "cat", "sat", "on", "mat", "é", "42", "Ünïcode", "a"]),
                 min_size=1, max_size=12).map(" ".join)
texts = st.one_of(st.text(max_size=60), words)


@quick
@given(metric=st.sampled_from(METRICS), answer=texts, reference=texts)
def test_every_similarity_metric_scores_within_zero_and_one(metric: str, answer: str,
                                                            reference: str) -> None:
    value, _ = similarity(metric, answer, reference)
    assert 0.0 <= value <= 1.0
    assert similarity(metric, answer, reference)[0] == value  # deterministic


@quick
@given(text=words)
def test_an_answer_equal_to_its_reference_scores_one(text: str) -> None:
    for metric in ("fuzzy_match", "gleu", "rouge_1", "rouge_l", "bleu"):
        assert similarity(metric, text, text)[0] == pytest.approx(1.0), metric


def make(criteria: list[dict[str, Any]], formula: str | None = None) -> Rubric:
    body: dict[str, Any] = {"criteria": criteria}
    if formula is not None:
        body["formula"] = formula
    return msgspec.convert(body, Rubric, strict=True)


LABEL = make([{"type": "label", "engine": "j", "labels": ["yes", "no"],
               "passing_labels": ["yes"]}]).criteria[0]
RUBRIC = make([{"type": "rubric_judge", "engine": "j", "criteria": [
    {"name": "a", "description": "x", "min": -5, "max": 5},
    {"name": "b", "description": "y", "weight": 3}]}]).criteria[0]
replies = st.one_of(
    st.text(max_size=200),
    st.builds(lambda label, extra: msgspec.json.encode({"label": label, **extra}).decode(),
              st.sampled_from(["yes", "no", "maybe", ""]),
              st.dictionaries(st.sampled_from(["reasoning", "x"]), st.text(max_size=5) | st.integers())),
    st.builds(lambda a, b: msgspec.json.encode({"scores": {"a": a, "b": b}}).decode(),
              st.floats(allow_nan=False, allow_infinity=False) | st.integers() | st.text(max_size=3),
              st.floats(min_value=-1, max_value=2)),
)


@quick
@given(reply=replies)
def test_a_structured_reply_is_a_score_in_range_or_a_judge_failure(reply: str) -> None:
    assert isinstance(LABEL, LabelCriterion) and isinstance(RUBRIC, RubricJudgeCriterion)
    for read in (read_label_reply(LABEL, reply), read_rubric_reply(RUBRIC, reply)):
        assert (read.score is None) == (read.error is not None)
        if read.score is not None:
            assert 0.0 <= read.score <= 1.0


names = st.sampled_from(["x", "y"])
numbers = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False).map(repr) | st.integers(
    -10, 10).map(str)
formulas = st.recursive(
    names | numbers,
    lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from(["+", "-", "*", "/", "^", "**"]), inner).map(
            lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(st.sampled_from(["min", "max", "abs", "floor", "ceil", "exp", "sqrt", "log"]),
                  inner).map(lambda t: f"{t[0]}({t[1]})"),
        inner.map(lambda e: f"-{e}"),
    ),
    max_leaves=8,
)


@quick
@given(formula=formulas, x=st.floats(0, 1), y=st.floats(0, 1))
def test_a_formula_evaluates_to_a_finite_number_or_fails_typed(formula: str, x: float,
                                                                y: float) -> None:
    try:
        value = evaluate_formula(formula, {"x": x, "y": y})
    except FormulaError:
        return
    assert value == value and abs(value) != float("inf")


@quick
@given(formula=formulas, answer=texts)
def test_a_rubric_with_a_formula_scores_within_zero_and_one(formula: str, answer: str) -> None:
    rubric = make([{"type": "similarity", "name": "x", "metric": "fuzzy_match", "value": "cat"},
                   {"type": "contains", "name": "y", "value": "a"}], formula)
    result = score(rubric, answer, None)
    assert 0.0 <= result.score <= 1.0
    assert not (result.passed and result.scoring_error)
