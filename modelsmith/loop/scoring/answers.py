"""Reading answers: refusals, the first (or last) number, embedded JSON, JSON field paths.

Pure helpers of the rubric's criteria.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final, Literal

import msgspec

from modelsmith.loop.scoring.criteria import json_path_segments

__all__ = ["NOT_FOUND", "extract_json", "first_number", "is_refusal_or_empty", "json_equal", "lookup"]


_REFUSAL_START: Final = re.compile(
    r"^\W*(?:(?:i['’]?m\s+)?sorry[,.!]?\s*(?:but\s+)?)?"
    r"(?:i\s+can['’]?t|i\s+cannot|i\s+can\s+not|i\s+won['’]?t|i\s+will\s+not|"
    r"i['’]?m\s+(?:unable|not\s+able)|i\s+am\s+(?:unable|not\s+able))\b",
    re.IGNORECASE,
)
_AS_AN_AI: Final = re.compile(r"\bas\s+an\s+ai\b", re.IGNORECASE)


def is_refusal_or_empty(response: str) -> bool:
    """An empty/whitespace answer, or an obvious refusal ("I can't", "I cannot", "as an AI")."""
    text = response.strip()
    if not text:
        return True
    head = text[:300]
    return bool(_REFUSAL_START.match(head) or _AS_AN_AI.search(head))


# A sign only when it does not follow a word ("x-5" reads 5, "3-5" reads 3 then 5); thousands
# separators only in groups of three ("1,234" is one number, "1,2,3" is three).
_NUMBER: Final = re.compile(
    r"(?:(?<![\w.])[-+])?(?<![\d.])(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?"
)


def first_number(text: str, *, occurrence: Literal["first", "last"] = "first") -> float | None:
    """The first (or last) number written in ``text``, or None."""
    if occurrence == "first":
        match = _NUMBER.search(text)
        if match is None:
            return None
        token = match.group()
    else:
        tokens = _NUMBER.findall(text)
        if not tokens:
            return None
        token = tokens[-1]
    return float(token.replace(",", ""))


NOT_FOUND: Final = object()  # what lookup returns for a missing field
_MAX_EMBEDDED_ATTEMPTS: Final = 64
_JSON_DECODER: Final = json.JSONDecoder()


def extract_json(response: str, *, allow_surrounding_text: bool = True) -> tuple[bool, Any]:
    """``(True, value)`` for the answer as JSON, else its first embedded JSON object."""
    text = response.strip()
    try:
        return True, msgspec.json.decode(text)
    except (msgspec.DecodeError, RecursionError):  # absurd nesting is just not JSON here
        pass
    if not allow_surrounding_text:
        return False, None
    start = text.find("{")
    attempts = 0
    while start != -1 and attempts < _MAX_EMBEDDED_ATTEMPTS:
        attempts += 1
        try:
            value, _ = _JSON_DECODER.raw_decode(text, start)
        except (ValueError, RecursionError):
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict):
            return True, value
        start = text.find("{", start + 1)
    return False, None


def lookup(document: Any, path: str) -> Any:
    current = document
    for segment in json_path_segments(path):
        if isinstance(current, dict) and segment in current:
            current = current[segment]
        elif isinstance(current, list) and segment.isdigit() and int(segment) < len(current):
            current = current[int(segment)]
        else:
            return NOT_FOUND
    return current


def json_equal(left: Any, right: Any) -> bool:
    # Python says True == 1; JSON does not.
    if isinstance(left, bool) or isinstance(right, bool):
        return type(left) is type(right) and left == right
    if isinstance(left, int | float) and isinstance(right, int | float):
        return float(left) == float(right)
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(json_equal(left[k], right[k]) for k in left)
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(map(json_equal, left, right))
    return type(left) is type(right) and bool(left == right)
