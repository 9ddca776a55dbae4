"""Scoring bounded in time: a per-answer deadline that every regex match honours.

A pattern written by a scenario's author runs against an answer written by a model, and a
pattern like ``^(a+)+$`` backtracks exponentially. Every such match - ``regex`` criteria and the
``pattern``/``patternProperties``/``additionalProperties`` keywords of JSON schemas - goes through
:func:`bounded_search`, which uses the maintained ``regex`` package with a timeout and releases
the GIL while matching (``concurrent=True``), so the daemon keeps answering while a worker thread
matches. :func:`score_deadline` opens the per-answer budget (:data:`SCORE_TIME_LIMIT_S`); past it
a match raises :class:`ScoringTimeout`, which :func:`~modelsmith.loop.scoring.rubric.score`
reports as the criterion's ``scoring_timeout``.

What can be refused before any answer exists is refused when a schema is loaded
(:func:`schema_problem`): a ``$ref`` that leaves the schema (remote), one that reaches itself
(a cycle), ``$dynamicRef``/``$recursiveRef``, and patterns that do not compile.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator
from typing import Any, Final
from urllib.parse import unquote

import jsonschema.validators
import regex
from jsonschema.exceptions import ValidationError as SchemaValidationError

__all__ = [
    "SCORE_TIME_LIMIT_S",
    "ScoringTimeout",
    "bounded_search",
    "bounded_validator_class",
    "schema_problem",
    "score_deadline",
]

#: The time one answer's scoring may spend matching patterns (all its criteria together).
SCORE_TIME_LIMIT_S: Final = 0.25

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "modelsmith_score_deadline", default=None
)


class ScoringTimeout(Exception):
    """Matching a pattern against one answer ran past the answer's scoring time limit."""


@contextlib.contextmanager
def score_deadline(limit_s: float = SCORE_TIME_LIMIT_S) -> Iterator[None]:
    """Bound the pattern matching inside the block to ``limit_s`` seconds in all. A deadline
    already open (an outer answer) is kept when it is sooner."""
    outer = _deadline.get()
    mine = time.monotonic() + limit_s
    token = _deadline.set(mine if outer is None else min(outer, mine))
    try:
        yield
    finally:
        _deadline.reset(token)


def _remaining() -> float:
    deadline = _deadline.get()
    if deadline is None:
        return SCORE_TIME_LIMIT_S  # a bare call outside score(): one answer's budget per match
    left = deadline - time.monotonic()
    if left <= 0:
        raise ScoringTimeout(f"scoring ran past {SCORE_TIME_LIMIT_S:g} s")
    return left


def bounded_search(pattern: regex.Pattern[str] | str, text: str, *, full: bool = False) -> bool:
    """Whether ``pattern`` finds (or, with ``full``, wholly matches) ``text`` within the
    remaining budget; raises :class:`ScoringTimeout` past it."""
    compiled = regex.compile(pattern) if isinstance(pattern, str) else pattern
    timeout = _remaining()
    try:
        if full:
            return compiled.fullmatch(text, concurrent=True, timeout=timeout) is not None
        return compiled.search(text, concurrent=True, timeout=timeout) is not None
    except TimeoutError as exc:
        raise ScoringTimeout(f"a pattern ran past {SCORE_TIME_LIMIT_S:g} s") from exc


# ---------------------------------------------------------------------------------------------
# JSON schemas whose pattern keywords are bounded


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[Any]:
    if validator.is_type(instance, "string") and not bounded_search(pattern, instance):
        yield SchemaValidationError(f"does not match the pattern {pattern!r}")


def _pattern_properties(
    validator: Any, properties: dict[str, Any], instance: Any, schema: Any
) -> Iterator[Any]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in properties.items():
        for key, value in instance.items():
            if bounded_search(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(
    validator: Any, additional: Any, instance: Any, schema: Any
) -> Iterator[Any]:
    if not validator.is_type(instance, "object"):
        return
    properties = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    extras = [
        key
        for key in instance
        if key not in properties and not any(bounded_search(p, key) for p in patterns)
    ]
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        yield SchemaValidationError(
            f"additional properties are not allowed ({len(extras)} unexpected)"
        )


_BOUNDED: Final = {
    "pattern": _pattern,
    "patternProperties": _pattern_properties,
    "additionalProperties": _additional_properties,
}


def bounded_validator_class(cls: Any) -> Any:
    """``cls`` (a jsonschema validator class) with its pattern keywords time-bounded."""
    return jsonschema.validators.extend(cls, validators=_BOUNDED)  # type: ignore[no-untyped-call]


# ---------------------------------------------------------------------------------------------
# Load-time checks

_UNBOUNDABLE: Final = ("$dynamicRef", "$recursiveRef")


def _walk(node: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
    stack = [(path, node)]
    while stack:  # iterative: a deep schema must not exhaust the Python stack here
        here, value = stack.pop()
        yield here, value
        if isinstance(value, dict):
            stack.extend(((*here, str(k)), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend(((*here, str(i)), v) for i, v in enumerate(value))


def _pointer(ref: str) -> tuple[str, ...] | None:
    """``#/a/b~1c`` -> ``("a", "b/c")``; None for anything that is not a local JSON pointer."""
    if ref == "#":
        return ()
    if not ref.startswith("#/"):
        return None
    return tuple(unquote(part).replace("~1", "/").replace("~0", "~") for part in ref[2:].split("/"))


def _resolves(schema: Any, path: tuple[str, ...]) -> bool:
    node = schema
    for part in path:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def _where(path: tuple[str, ...]) -> str:
    return "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in path)


def schema_problem(schema: dict[str, Any]) -> tuple[str, str] | None:
    """``(field suffix, problem)`` for the first thing in ``schema`` that would fail or never
    end on an answer, or None. Refused: remote or non-pointer ``$ref``, a ``$ref`` that does not
    resolve, a cycle of ``$ref``s, ``$dynamicRef``/``$recursiveRef``, and a pattern that does not
    compile."""
    refs: list[tuple[tuple[str, ...], tuple[str, ...]]] = []  # (where the $ref is, its target)
    keywords = {key for _, node in _walk(schema, ()) if isinstance(node, dict) for key in node}
    if {"unevaluatedProperties", "patternProperties"} <= keywords:
        # jsonschema matches patternProperties for unevaluatedProperties with unbounded `re`.
        return "", "`unevaluatedProperties` with `patternProperties` is not supported"
    for path, node in _walk(schema, ()):
        if not isinstance(node, dict):
            continue
        for keyword in _UNBOUNDABLE:
            if keyword in node:
                return _where((*path, keyword)), f"`{keyword}` is not supported"
        patterns = list(node.get("patternProperties", {}) or {})
        if isinstance(node.get("pattern"), str):
            patterns.append(node["pattern"])
        for pattern in patterns:
            try:
                regex.compile(pattern)
            except (regex.error, ValueError, OverflowError, TypeError):
                return _where(path), f"pattern {pattern!r} does not compile"
        ref = node.get("$ref")
        if ref is None:
            continue
        if not isinstance(ref, str):
            return _where((*path, "$ref")), "`$ref` must be a string"
        target = _pointer(ref)
        if target is None:
            return _where((*path, "$ref")), "only local `$ref`s (`#/...`) are allowed"
        if not _resolves(schema, target):
            return _where((*path, "$ref")), f"`$ref` {ref!r} resolves to nothing"
        refs.append((path, target))
    # A $ref reaches every $ref inside its target; a cycle would recurse on every answer.
    inside: dict[int, list[int]] = {
        i: [j for j, (where, _) in enumerate(refs) if where[: len(target)] == target]
        for i, (_, target) in enumerate(refs)
    }
    state: dict[int, int] = {}  # 1: on the current path, 2: done
    for start in inside:
        if start in state:
            continue
        stack: list[tuple[int, Iterator[int]]] = [(start, iter(inside[start]))]
        state[start] = 1
        while stack:
            node_index, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node_index] = 2
                stack.pop()
            elif state.get(child) == 1:
                return _where((*refs[child][0], "$ref")), "`$ref` refers back to itself"
            elif child not in state:
                state[child] = 1
                stack.append((child, iter(inside[child])))
    return None
