"""Judges with a structured reply: ``label`` (one of a set of labels) and ``rubric_judge``
(several named criteria scored in one call).

Both send the judge engine their ``template`` (the grading instructions; placeholders
``{prompt} {response} {reference}`` and ``{labels}`` or ``{criteria}``) followed by
:data:`REPLY_INSTRUCTIONS`: reply with one JSON object and nothing else, matching a JSON schema
built from the criterion (:meth:`reply_schema`). The reply is validated against that schema
(:mod:`modelsmith.loop.scoring.judge_replies`); anything else is a judge failure, never a 0 for
the judged model. The ``reasoning`` the reply may carry is kept in the results, beside the score,
and is never part of anything the judged model is shown (its prompts come from the scenario).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Final

import msgspec
from msgspec import Meta, Struct

from modelsmith.loop.scoring.criterion_base import (
    CriterionBase,
    InvalidField,
    NonEmptyText,
    Weight,
    check_template,
)

__all__ = [
    "DEFAULT_LABEL_TEMPLATE",
    "DEFAULT_RUBRIC_TEMPLATE",
    "REPLY_INSTRUCTIONS",
    "JudgedCriterion",
    "LabelCriterion",
    "RubricJudgeCriterion",
    "escape_literal",
]

#: A criterion name of a rubric judge: a formula-friendly identifier.
CriterionName = Annotated[str, Meta(pattern=r"\A[A-Za-z_][A-Za-z0-9_]{0,63}\Z")]

DEFAULT_LABEL_TEMPLATE: Final = (
    "Classify the answer.\n\nQuestion:\n{prompt}\n\nReference answer:\n{reference}\n\n"
    "Answer to classify:\n{response}\n\nLabels: {labels}"
)
DEFAULT_RUBRIC_TEMPLATE: Final = (
    "You are grading an answer on several criteria.\n\nQuestion:\n{prompt}\n\n"
    "Reference answer:\n{reference}\n\nAnswer to grade:\n{response}\n\nCriteria:\n{criteria}"
)
REPLY_INSTRUCTIONS: Final = (
    "\n\nReply with one JSON object and nothing else (no prose, no code fence), "
    "valid against this JSON schema:\n{schema}"
)

_COMMON_PLACEHOLDERS: Final = frozenset({"prompt", "response", "reference"})
_NO_REFERENCE: Final = "(no reference answer given)"


def escape_literal(text: str) -> str:
    """``text`` as literal text inside a template (an imported item's value): braces doubled."""
    return text.replace("{", "{{").replace("}", "}}")


def _reply_suffix(schema: dict[str, Any]) -> str:
    encoded = msgspec.json.encode(schema, order="sorted").decode()
    return REPLY_INSTRUCTIONS.format(schema=encoded)


class LabelCriterion(CriterionBase, frozen=True, tag="label"):
    """A judge engine picks one of ``labels`` for the answer; credit 1 when it is one of
    ``passing_labels``, else 0 (OpenAI's ``label_model``)."""

    kind: ClassVar[str] = "label"
    engine: NonEmptyText
    labels: Annotated[tuple[NonEmptyText, ...], Meta(min_length=2, max_length=100)]
    passing_labels: Annotated[tuple[NonEmptyText, ...], Meta(min_length=1)]
    template: str = DEFAULT_LABEL_TEMPLATE

    def _check(self) -> None:
        if len(set(self.labels)) != len(self.labels):
            raise InvalidField("invalid_value", "labels", "duplicate label")
        for index, label in enumerate(self.passing_labels):
            if label not in self.labels:
                raise InvalidField("invalid_value", f"passing_labels[{index}]",
                                   f"{label!r} is not one of `labels`")
        check_template(self.template, _COMMON_PLACEHOLDERS | {"labels"})

    def reply_schema(self) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {"label": {"enum": list(self.labels)}, "reasoning": {"type": "string"}},
            "required": ["label"],
            "additionalProperties": False,
        }

    def render(self, *, prompt: str, response: str, reference: str | None) -> str:
        body = self.template.format(
            prompt=prompt, response=response,
            reference=reference if reference is not None else _NO_REFERENCE,
            labels=", ".join(self.labels),
        )
        return body + _reply_suffix(self.reply_schema())


class JudgedCriterion(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One criterion a rubric judge scores: a number in ``min..max`` (higher is better)."""

    name: CriterionName
    description: NonEmptyText
    weight: Weight = 1.0
    min: float = 0.0
    max: float = 1.0


class RubricJudgeCriterion(CriterionBase, frozen=True, tag="rubric_judge"):
    """A judge engine scores several named criteria in one call. Each score is normalised from its
    ``min..max`` to 0..1; the credit is their weighted mean, passed at ``pass_threshold`` (or the
    rubric's pass mark)."""

    kind: ClassVar[str] = "rubric_judge"
    engine: NonEmptyText
    criteria: Annotated[tuple[JudgedCriterion, ...], Meta(min_length=1, max_length=50)]
    template: str = DEFAULT_RUBRIC_TEMPLATE
    pass_threshold: Annotated[float, Meta(ge=0, le=1)] | None = None

    def _check(self) -> None:
        seen: set[str] = set()
        for index, item in enumerate(self.criteria):
            if item.name in seen:
                raise InvalidField("invalid_value", f"criteria[{index}].name", "duplicate name")
            seen.add(item.name)
            if not (math.isfinite(item.min) and math.isfinite(item.max)) or item.min >= item.max:
                raise InvalidField("invalid_value", f"criteria[{index}].max",
                                   "min and max must be finite numbers with min < max")
            if not math.isfinite(item.weight):
                raise InvalidField("bad_weight", f"criteria[{index}].weight", "must be finite")
        check_template(self.template, _COMMON_PLACEHOLDERS | {"criteria"})

    def reply_schema(self) -> dict[str, Any]:
        scores = {
            item.name: {"type": "number", "minimum": item.min, "maximum": item.max}
            for item in self.criteria
        }
        return {
            "type": "object",
            "properties": {
                "scores": {
                    "type": "object", "properties": scores,
                    "required": [item.name for item in self.criteria],
                    "additionalProperties": False,
                },
                "reasoning": {"type": "string"},
            },
            "required": ["scores"],
            "additionalProperties": False,
        }

    def describe_criteria(self) -> str:
        return "\n".join(f"- {item.name} ({item.min:g} to {item.max:g}): {item.description}"
                         for item in self.criteria)

    def render(self, *, prompt: str, response: str, reference: str | None) -> str:
        body = self.template.format(
            prompt=prompt, response=response,
            reference=reference if reference is not None else _NO_REFERENCE,
            criteria=self.describe_criteria(),
        )
        return body + _reply_suffix(self.reply_schema())

    def combine(self, scores: dict[str, float]) -> tuple[float, dict[str, float]]:
        """The weighted mean of the normalised scores, and each criterion's normalised score."""
        parts = {item.name: (scores[item.name] - item.min) / (item.max - item.min)
                 for item in self.criteria}
        total = sum(item.weight for item in self.criteria)
        mean = sum(item.weight * parts[item.name] for item in self.criteria) / total
        return min(1.0, max(0.0, mean)), parts
