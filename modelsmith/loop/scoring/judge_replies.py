"""Reading a structured judge reply strictly: one JSON object, valid against the criterion's
reply schema (:meth:`LabelCriterion.reply_schema`, :meth:`RubricJudgeCriterion.reply_schema`).

The reply, stripped, must be exactly one JSON object; one surrounding Markdown code fence is
tolerated (models add them however they are asked). Anything else (prose around it, two
objects, a missing or extra key, a label not in the set, a score outside its range, a reply past
:data:`MAX_REPLY_CHARS`) is a :class:`StructuredReply` with ``error`` set: a judge failure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from modelsmith.loop.scoring.criteria import schema_validator
from modelsmith.loop.scoring.judges import LabelCriterion, RubricJudgeCriterion

__all__ = ["MAX_REPLY_CHARS", "StructuredReply", "read_label_reply", "read_rubric_reply"]

MAX_REPLY_CHARS: Final = 64 * 1024
_FENCE: Final = re.compile(r"\A```[A-Za-z0-9_-]*[ \t]*\n(?P<body>.*)\n```\Z", re.DOTALL)


@dataclass(frozen=True, slots=True)
class StructuredReply:
    """A judge's structured reply read: ``score`` in [0, 1] when well-formed, else ``error``."""

    score: float | None
    error: str | None = None
    reasoning: str | None = None
    parts: dict[str, float] | None = None
    label: str | None = None


def _document(text: str, schema: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    if len(text) > MAX_REPLY_CHARS:
        return None, f"reply longer than {MAX_REPLY_CHARS} characters"
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group("body").strip()
    if not body.startswith("{"):
        return None, "the reply is not one JSON object"
    try:
        document = msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError, ValueError) as exc:
        return None, f"not JSON: {str(exc)[:120]}"
    if not isinstance(document, dict):
        return None, "the reply is not one JSON object"
    error = next(iter(schema_validator(schema).iter_errors(document)), None)
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path) or "(root)"
        return None, f"reply schema: at {where}: {error.message[:160]}"
    return document, None


def _reasoning(document: dict[str, Any]) -> str | None:
    value = document.get("reasoning")
    return value if isinstance(value, str) else None


def read_label_reply(criterion: LabelCriterion, text: str) -> StructuredReply:
    document, error = _document(text, criterion.reply_schema())
    if document is None:
        return StructuredReply(score=None, error=error)
    label = str(document["label"])
    passed = label in criterion.passing_labels
    return StructuredReply(score=1.0 if passed else 0.0, reasoning=_reasoning(document),
                           label=label)


def read_rubric_reply(criterion: RubricJudgeCriterion, text: str) -> StructuredReply:
    document, error = _document(text, criterion.reply_schema())
    if document is None:
        return StructuredReply(score=None, error=error)
    scores = {name: float(value) for name, value in document["scores"].items()}
    total, parts = criterion.combine(scores)
    return StructuredReply(score=total, reasoning=_reasoning(document), parts=parts)
