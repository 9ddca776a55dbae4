"""Rubric scoring: grade one answer against a scenario's rubric.

Scoring is pure, synchronous Python and is the very code the GRPO reward calls: what is graded is
what is trained. Each criterion scores in [0, 1]; the scenario's score is the weighted mean of its
criteria and passes at the rubric's ``pass_mark``.

An ``llm_judge`` criterion is scored from a :class:`JudgeVerdict` obtained beforehand (see
:func:`score_with_judge`, which asks the judge engine). A judge that fails - the call raised, or
its reply has no well-formed ``SCORE:`` line - is a *judge failure*: the criterion is reported
with ``error_kind="judge_failure"``, it is left out of the weighted mean (the model is never
charged a 0 for the judge's fault), and the whole result is marked ``judge_error`` and not passed.

The criteria themselves (types, options, load-time checks) are in
:mod:`modelsmith.loop.scoring.criteria`; they are re-exported here.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Literal

import anyio
from msgspec import Struct, UnsetType

from modelsmith.errors import ValidationError
from modelsmith.loop.scoring.answers import (
    NOT_FOUND,
    extract_json,
    first_number,
    is_refusal_or_empty,
    json_equal,
    lookup,
)
from modelsmith.loop.scoring.bounded import (
    SCORE_TIME_LIMIT_S,
    ScoringTimeout,
    bounded_search,
    score_deadline,
)
from modelsmith.loop.scoring.criteria import (
    JUDGE_KINDS,
    ChoiceCriterion,
    ContainsCriterion,
    Criterion,
    ExactCriterion,
    JsonCriterion,
    LabelCriterion,
    LengthCriterion,
    LlmJudgeCriterion,
    NotContainsCriterion,
    NumericCriterion,
    RegexCriterion,
    Rubric,
    RubricJudgeCriterion,
    SimilarityCriterion,
    parse_reference_number,
    schema_validator,
)
from modelsmith.loop.scoring.formula import FormulaError, evaluate_formula
from modelsmith.loop.scoring.judge_replies import read_label_reply, read_rubric_reply
from modelsmith.loop.scoring.similarity import similarity

__all__ = [
    "ERROR_KINDS",
    "ChoiceCriterion",
    "ContainsCriterion",
    "Criterion",
    "CriterionResult",
    "ErrorKind",
    "ExactCriterion",
    "JsonCriterion",
    "JudgeFn",
    "JudgeVerdict",
    "LengthCriterion",
    "LlmJudgeCriterion",
    "NotContainsCriterion",
    "NumericCriterion",
    "RegexCriterion",
    "Rubric",
    "RubricScore",
    "extract_json",
    "first_number",
    "is_refusal_or_empty",
    "judge_prompt",
    "parse_judge_reply",
    "score",
    "score_with_judge",
]

ErrorKind = Literal[
    "wrong_format",
    "wrong_value",
    "out_of_tolerance",
    "refusal_or_empty",
    "too_long",
    "too_short",
    "forbidden_content",
    "missing_content",
    "judge_failure",
    "scoring_timeout",
    "scoring_error",
]
ERROR_KINDS: Final[tuple[str, ...]] = ErrorKind.__args__  # type: ignore[attr-defined]


class CriterionResult(Struct, frozen=True, kw_only=True):
    """How one criterion graded one answer (a line item of ``results.jsonl``)."""

    name: str
    type: str
    weight: float
    score: float
    passed: bool
    detail: str
    error_kind: ErrorKind | None = None
    #: a structured judge's reasoning (kept for reviewers; never shown to the judged model)
    reasoning: str | None = None
    #: a rubric judge's normalised score per named criterion
    parts: dict[str, float] | None = None


class RubricScore(Struct, frozen=True, kw_only=True):
    """How a rubric graded one answer: the weighted mean and each criterion's result."""

    score: float
    passed: bool
    pass_mark: float
    criteria: tuple[CriterionResult, ...]
    judge_error: bool = False
    scoring_error: bool = False
    #: why the rubric's ``formula`` could not combine these scores (then ``scoring_error``)
    formula_error: str | None = None


class JudgeVerdict(Struct, frozen=True, kw_only=True):
    """A judge's reply: ``score`` in [0, 1] when well-formed, otherwise ``error`` says why."""

    score: float | None
    raw: str
    error: str | None = None
    reasoning: str | None = None
    parts: dict[str, float] | None = None
    label: str | None = None


#: One call to a judge engine: prompt text in, reply text out.
JudgeFn = Callable[[str], Awaitable[str]]


def _clip(text: str, limit: int = 60) -> str:
    shown = text if len(text) <= limit else text[: limit - 1] + "…"
    return repr(shown)


# ---------------------------------------------------------------------------------------------
# One scorer per criterion type: (criterion, response, reference) -> outcome

_Outcome = tuple[float, bool, str, ErrorKind | None]


def _expected(criterion: Criterion, value: str | None, reference: str | None) -> str:
    if value is not None:
        return value
    if reference is None:
        raise ValidationError(
            f"criterion {criterion.label!r} compares against the reference, and none was given",
            data={"field": "reference"},
        )
    return reference


def _score_exact(criterion: ExactCriterion, response: str, reference: str | None) -> _Outcome:
    expected = _expected(criterion, criterion.value, reference)
    if criterion.normalize(response) == criterion.normalize(expected):
        return 1.0, True, "matches", None
    return 0.0, False, f"expected {_clip(expected)}, got {_clip(response)}", "wrong_value"


def _fold(text: str, case_sensitive: bool) -> str:
    return text if case_sensitive else text.casefold()


def _score_contains(criterion: ContainsCriterion, response: str, reference: str | None) -> _Outcome:
    needles = criterion.needles() or (_expected(criterion, None, reference),)
    haystack = _fold(response, criterion.case_sensitive)
    missing = [n for n in needles if _fold(n, criterion.case_sensitive) not in haystack]
    if criterion.mode == "any":
        if len(missing) < len(needles):
            return 1.0, True, "contains one of the needles", None
        return 0.0, False, f"contains none of {len(needles)} needle(s)", "missing_content"
    if not missing:
        return 1.0, True, "contains all", None
    found = len(needles) - len(missing)
    detail = f"missing {len(missing)} of {len(needles)}: " + ", ".join(map(_clip, missing[:3]))
    return found / len(needles), False, detail, "missing_content"


def _score_not_contains(
    criterion: NotContainsCriterion, response: str, reference: str | None
) -> _Outcome:
    needles = criterion.needles()
    haystack = _fold(response, criterion.case_sensitive)
    present = [n for n in needles if _fold(n, criterion.case_sensitive) in haystack]
    if not present:
        return 1.0, True, "contains none", None
    detail = f"contains {len(present)} forbidden: " + ", ".join(map(_clip, present[:3]))
    return 1.0 - len(present) / len(needles), False, detail, "forbidden_content"


def _score_regex(criterion: RegexCriterion, response: str, reference: str | None) -> _Outcome:
    pattern = criterion.compiled()
    if criterion.must_match == "full":
        matched = bounded_search(pattern, response.strip(), full=True)
    else:
        matched = bounded_search(pattern, response)
    if matched:
        return 1.0, True, "matches", None
    return (
        0.0,
        False,
        f"does not {criterion.must_match}-match {_clip(criterion.pattern)}",
        ("wrong_format"),
    )


def _score_json(criterion: JsonCriterion, response: str, reference: str | None) -> _Outcome:
    found, document = extract_json(
        response, allow_surrounding_text=criterion.allow_surrounding_text
    )
    if not found:
        return 0.0, False, "no JSON found", "wrong_format"
    if criterion.mode == "valid":
        return 1.0, True, "valid JSON", None
    if criterion.mode == "schema":
        assert criterion.schema is not None  # checked at load time
        validator = schema_validator(criterion.schema)
        error = next(iter(validator.iter_errors(document)), None)
        if error is None:
            return 1.0, True, "matches the schema", None
        where = "/".join(str(part) for part in error.absolute_path) or "(root)"
        return 0.0, False, f"schema: at {where}: {error.message[:120]}", "wrong_format"
    assert criterion.field is not None and not isinstance(criterion.value, UnsetType)
    actual = lookup(document, criterion.field)
    if actual is NOT_FOUND:
        return 0.0, False, f"no field {criterion.field!r}", "missing_content"
    if json_equal(actual, criterion.value):
        return 1.0, True, f"{criterion.field} matches", None
    detail = f"{criterion.field}: expected {_clip(json.dumps(criterion.value))}, got " + _clip(
        json.dumps(actual)
    )
    return 0.0, False, detail, "wrong_value"


def _read_number(criterion: NumericCriterion, response: str) -> float | None:
    if criterion.field is None:
        return first_number(response, occurrence=criterion.occurrence)
    found, document = extract_json(response)
    if not found:
        return None
    value = lookup(document, criterion.field)
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return parse_reference_number(value)
        except ValueError:
            return None
    return None


def numeric_credit(error: float, tolerance: float, partial_width: float) -> float:
    """Credit for a numeric answer ``error`` away from its target: 1 within ``tolerance``, then
    linearly down to 0 over ``partial_width``; non-increasing in ``error``."""
    if error <= tolerance:
        return 1.0
    if partial_width <= 0:
        return 0.0
    return max(0.0, 1.0 - (error - tolerance) / partial_width)


def _score_numeric(criterion: NumericCriterion, response: str, reference: str | None) -> _Outcome:
    if criterion.value is not None:
        target = criterion.value
    else:
        expected = _expected(criterion, None, reference)
        try:
            target = parse_reference_number(expected)
        except ValueError as exc:
            raise ValidationError(
                f"reference {expected!r} is not a number", data={"field": "reference"}
            ) from exc
    actual = _read_number(criterion, response)
    where = f"field {criterion.field!r}" if criterion.field else "the answer"
    if actual is None or not math.isfinite(actual):
        return 0.0, False, f"no number in {where}", "wrong_format"
    error = abs(actual - target)
    tolerance = criterion.tolerance(target)
    credit = numeric_credit(error, tolerance, criterion.partial_width)
    if error <= tolerance:
        return credit, True, f"{actual:g} within {tolerance:g} of {target:g}", None
    detail = f"{actual:g} is {error:g} from {target:g} (tolerance {tolerance:g})"
    return credit, False, detail, "out_of_tolerance"


def _score_choice(criterion: ChoiceCriterion, response: str, reference: str | None) -> _Outcome:
    expected = _expected(criterion, criterion.value, reference)
    answer = criterion.normalize(response)
    if answer not in {criterion.normalize(label) for label in criterion.labels}:
        return 0.0, False, f"{_clip(response)} is not one of the labels", "wrong_format"
    if answer == criterion.normalize(expected):
        return 1.0, True, "right label", None
    return 0.0, False, f"chose {_clip(answer)}, expected {_clip(expected)}", "wrong_value"


def _bound_credit(actual: int, low: int | None, high: int | None) -> tuple[float, ErrorKind | None]:
    if low is not None and actual < low:
        return actual / low, "too_short"
    if high is not None and actual > high:
        return high / actual, "too_long"
    return 1.0, None


def _score_length(criterion: LengthCriterion, response: str, reference: str | None) -> _Outcome:
    text = response.strip()
    chars, words = len(text), len(text.split())
    char_credit, char_kind = _bound_credit(chars, criterion.min_chars, criterion.max_chars)
    word_credit, word_kind = _bound_credit(words, criterion.min_words, criterion.max_words)
    kind = char_kind or word_kind
    if kind is None:
        return 1.0, True, f"{chars} chars, {words} words", None
    return min(char_credit, word_credit), False, f"{chars} chars, {words} words: {kind}", kind


def _score_similarity(
    criterion: SimilarityCriterion, response: str, reference: str | None
) -> _Outcome:
    expected = _expected(criterion, criterion.value, reference)
    text = response
    if criterion.field is not None:
        found, document = extract_json(response)
        value = lookup(document, criterion.field) if found else NOT_FOUND
        if value is NOT_FOUND or isinstance(value, dict | list):
            return 0.0, False, f"no text field {criterion.field!r}", "missing_content"
        text = value if isinstance(value, str) else json.dumps(value)
    value, cut = similarity(criterion.metric, text, expected)
    detail = f"{criterion.metric} {value:.3g} (pass at {criterion.pass_threshold:g})" + (
        ", texts cut to the metric's bound" if cut else "")
    if value >= criterion.pass_threshold:
        return value, True, detail, None
    return value, False, detail, "wrong_value"


_SCORERS: Final[dict[type[Any], Callable[[Any, str, str | None], _Outcome]]] = {
    ExactCriterion: _score_exact,
    ContainsCriterion: _score_contains,
    NotContainsCriterion: _score_not_contains,
    RegexCriterion: _score_regex,
    JsonCriterion: _score_json,
    NumericCriterion: _score_numeric,
    ChoiceCriterion: _score_choice,
    LengthCriterion: _score_length,
    SimilarityCriterion: _score_similarity,
}


# ---------------------------------------------------------------------------------------------
# Judges


_SCORE_LINE: Final = re.compile(r"^\s*SCORE:[ \t]*([0-9]+(?:\.[0-9]+)?)\s*$", re.IGNORECASE)
_SCORE_WORD: Final = re.compile(r"^\s*SCORE\s*:", re.IGNORECASE)


def parse_judge_reply(text: str, *, scale: float) -> JudgeVerdict:
    """Read a judge's reply strictly: exactly one ``SCORE: <number in 0..scale>`` line (repeats
    must agree). Anything else is a verdict with ``error`` set and ``score`` None."""
    values: list[float] = []
    for line in text.splitlines():
        match = _SCORE_LINE.match(line)
        if match:
            values.append(float(match.group(1)))
        elif _SCORE_WORD.match(line):
            return JudgeVerdict(score=None, raw=text, error=f"malformed score line {_clip(line)}")
    if not values:
        return JudgeVerdict(score=None, raw=text, error="no `SCORE: <number>` line")
    if len(set(values)) > 1:
        return JudgeVerdict(score=None, raw=text, error="conflicting SCORE lines")
    value = values[0]
    if not 0.0 <= value <= scale:
        return JudgeVerdict(score=None, raw=text, error=f"score {value:g} outside 0..{scale:g}")
    return JudgeVerdict(score=value / scale, raw=text, error=None)


def judge_prompt(
    criterion: LlmJudgeCriterion | LabelCriterion | RubricJudgeCriterion, prompt_text: str,
    response: str, reference: str | None,
) -> str:
    """The text sent to the judge engine for one answer."""
    return criterion.render(prompt=prompt_text, response=response, reference=reference)


def _judge_outcome(
    criterion: Any, verdict: JudgeVerdict | None, pass_mark: float
) -> tuple[_Outcome, bool]:
    if verdict is None:
        return (0.0, False, "no judge verdict", "judge_failure"), True
    if verdict.error is not None or verdict.score is None:
        return (0.0, False, f"judge failure: {verdict.error or 'no score'}", "judge_failure"), True
    judged = min(1.0, max(0.0, verdict.score))
    if isinstance(criterion, LabelCriterion):
        passed = verdict.label in criterion.passing_labels
        said = f"labelled {verdict.label!r}"
    else:
        threshold = getattr(criterion, "pass_threshold", None)
        passed = judged >= (pass_mark if threshold is None else threshold)
        said = f"scored {judged:.3g}"
    kind: ErrorKind | None = None if passed else "wrong_value"
    return (judged, passed, f"judge {criterion.engine!r} {said}", kind), False


def _read_reply(criterion: Any, reply: str) -> JudgeVerdict:
    """The verdict in ``reply``, read strictly by the criterion's kind."""
    if isinstance(criterion, LlmJudgeCriterion):
        return parse_judge_reply(reply, scale=criterion.scale)
    read = (read_label_reply(criterion, reply) if isinstance(criterion, LabelCriterion)
            else read_rubric_reply(criterion, reply))
    return JudgeVerdict(score=read.score, raw=reply, error=read.error, reasoning=read.reasoning,
                        parts=read.parts, label=read.label)


# ---------------------------------------------------------------------------------------------
# Public scoring


def score(
    rubric: Rubric,
    response: str,
    reference: str | None,
    *,
    judge_verdicts: Mapping[int, JudgeVerdict] | None = None,
    time_limit_s: float = SCORE_TIME_LIMIT_S,
) -> RubricScore:
    """Grade ``response``. An ``llm_judge`` criterion at index i takes ``judge_verdicts[i]``;
    without one it is a judge failure.

    Pattern matching for this answer is bounded to ``time_limit_s`` in all: a criterion that runs
    past it is reported with ``error_kind="scoring_timeout"``, one whose scorer raises with
    ``"scoring_error"``; either is left out of the weighted mean (like a judge failure) and marks
    the result ``scoring_error`` and not passed. Raises ValidationError only when a criterion
    needs the reference and ``reference`` is None (scenarios are checked for that when loaded).
    """
    with score_deadline(time_limit_s):
        return _score(rubric, response, reference, judge_verdicts)


def _guarded(criterion: Criterion, response: str, reference: str | None) -> tuple[_Outcome, bool]:
    """The criterion's outcome, and whether scoring itself failed (a timeout or a crash)."""
    try:
        return _SCORERS[type(criterion)](criterion, response, reference), False
    except ValidationError:
        raise
    except ScoringTimeout as exc:
        return (0.0, False, str(exc), "scoring_timeout"), True
    except Exception as exc:  # a scorer's crash is this answer's error, never the caller's
        return (0.0, False, f"scoring failed: {type(exc).__name__}", "scoring_error"), True


def _score(
    rubric: Rubric,
    response: str,
    reference: str | None,
    judge_verdicts: Mapping[int, JudgeVerdict] | None,
) -> RubricScore:
    refused: bool | None = None  # computed once, only if something failed
    results: list[CriterionResult] = []
    weighted_sum = 0.0
    weight_total = 0.0
    low, high = 1.0, 0.0
    judge_error = False
    scoring_error = False
    for index, criterion in enumerate(rubric.criteria):
        verdict = None
        if isinstance(criterion, JUDGE_KINDS):
            verdict = judge_verdicts.get(index) if judge_verdicts is not None else None
            outcome, failed_judge = _judge_outcome(criterion, verdict, rubric.pass_mark)
            failed_scoring = False
        else:
            outcome, failed_scoring = _guarded(criterion, response, reference)
            failed_judge = False
        credit, passed, detail, kind = outcome
        if failed_scoring:
            scoring_error = True
        elif not passed and not failed_judge:
            if refused is None:
                refused = is_refusal_or_empty(response)
            if refused:
                kind = "refusal_or_empty"
        if failed_judge:
            judge_error = True
        elif not failed_scoring:
            weighted_sum += criterion.weight * credit
            weight_total += criterion.weight
            low, high = min(low, credit), max(high, credit)
        results.append(
            CriterionResult(
                name=criterion.label,
                type=criterion.kind,
                weight=criterion.weight,
                score=credit,
                passed=passed,
                detail=detail,
                error_kind=kind,
                reasoning=verdict.reasoning if verdict is not None else None,
                parts=verdict.parts if verdict is not None and not failed_judge else None,
            )
        )
    # Rounding must not push the mean outside its criteria's range (all-1.0 must be exactly 1.0).
    total = min(high, max(low, weighted_sum / weight_total)) if weight_total > 0 else 0.0
    formula_error = None
    if rubric.formula is not None and not judge_error and not scoring_error:
        # A failed criterion has no score to put in the formula: then the weighted mean of the
        # others stands, flagged (the result is not passed either way).
        try:
            combined = evaluate_formula(rubric.formula, {r.name: r.score for r in results})
            total = min(1.0, max(0.0, combined))
        except FormulaError as exc:
            formula_error, scoring_error, total = str(exc), True, 0.0
    return RubricScore(
        score=total,
        passed=not judge_error and not scoring_error and total >= rubric.pass_mark,
        pass_mark=rubric.pass_mark,
        criteria=tuple(results),
        judge_error=judge_error,
        scoring_error=scoring_error,
        formula_error=formula_error,
    )


async def score_with_judge(
    rubric: Rubric,
    response: str,
    reference: str | None,
    *,
    prompt_text: str,
    judge: JudgeFn | Mapping[str, JudgeFn],
) -> RubricScore:
    """Ask the judge for every ``llm_judge`` criterion (concurrently), then :func:`score`.

    ``judge`` is one engine call, or a mapping from a criterion's ``engine`` name to one. An
    exception from the call, or an engine missing from the mapping, is a judge failure;
    cancellation is not caught.
    """
    verdicts: dict[int, JudgeVerdict] = {}

    async def ask(index: int, criterion: Any) -> None:
        if isinstance(judge, Mapping):
            call = judge.get(criterion.engine)
            if call is None:
                verdicts[index] = JudgeVerdict(
                    score=None, raw="", error=f"no judge engine {criterion.engine!r}"
                )
                return
        else:
            call = judge
        text = judge_prompt(criterion, prompt_text, response, reference)
        try:
            reply = await call(text)
        except Exception as exc:  # an engine's failure is the judge's, never the model's
            verdicts[index] = JudgeVerdict(
                score=None, raw="", error=f"judge call failed: {type(exc).__name__}: {exc}"
            )
            return
        verdicts[index] = _read_reply(criterion, reply)

    async with anyio.create_task_group() as task_group:
        for index in rubric.judge_indices():
            task_group.start_soon(ask, index, rubric.criteria[index])
    return score(rubric, response, reference, judge_verdicts=verdicts)
