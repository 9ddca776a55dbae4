"""Where candidates come from: a teacher (a named engine) or a cluster's programmatic generator.

**Sources.** A failure pattern of ``diagnose`` names the scenarios that failed that way; only
its *core* scenarios are shown to a teacher or a generator (a held-out scenario is never a
source: that would leak it), at most :data:`SOURCES_PER_PATTERN` of them.

**The teacher** gets one chat per candidate (:func:`teacher_messages`): the source scenario
(prompt, reference, rubric), how the model failed it, and the reply format. The reply must be
exactly one JSON object (surrounding whitespace aside) decoding to :class:`TeacherReply`: no
prose, no code fence, no other field. Anything else is a malformed reply: counted as invalid
and dropped. The hash of each generation prompt is kept as the candidate's provenance.

**A generator** (``[synthesis] generator = "package.module:function"``) is called as
``function(pattern, sources, count)``: ``pattern`` a dict (``pattern``, ``criterion``,
``kind``, ``scenario_ids``), ``sources`` the source scenarios as dicts (the file format), and it
returns an iterable of candidate dicts with the teacher's fields and an optional ``source_id``
(one of the sources' ids; the first by default). At most ``MAX_PER_COUNT * count`` are read.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

import msgspec

from modelsmith.errors import ValidationError
from modelsmith.loop.scoring.scenarios import Scenario, ScenarioCatalog
from modelsmith.loop.synth.verify import Candidate
from modelsmith.rpc.schema.train import FailurePattern

__all__ = [
    "MAX_PER_COUNT",
    "SOURCES_PER_PATTERN",
    "TeacherReply",
    "candidates_from_generator",
    "load_generator",
    "parse_reply",
    "pattern_sources",
    "teacher_messages",
]

SOURCES_PER_PATTERN: Final = 3
MAX_PER_COUNT: Final = 4
MAX_REPLY_BYTES: Final = 64 * 1024

Generator = Callable[[dict[str, Any], list[dict[str, Any]], int], Iterable[Any]]


class TeacherReply(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The only reply a teacher may give (its JSON schema is in the teacher's prompt)."""

    prompt: str
    reference: str
    rubric: dict[str, Any]
    tags: list[str] = []


REPLY_SCHEMA: Final = msgspec.json.schema(TeacherReply)


def pattern_sources(pattern: FailurePattern, catalog: ScenarioCatalog) -> list[Scenario]:
    """The core scenarios of ``pattern`` (never a held-out one), at most
    :data:`SOURCES_PER_PATTERN`, in the pattern's order."""
    out = []
    for scenario_id in pattern.scenario_ids:
        scenario = catalog.get(scenario_id)
        if scenario is not None and scenario.set == "core":
            out.append(scenario)
        if len(out) == SOURCES_PER_PATTERN:
            break
    return out


def _scenario_view(scenario: Scenario) -> dict[str, Any]:
    view: dict[str, Any] = msgspec.to_builtins(scenario)
    return {k: view[k] for k in ("prompt", "reference", "rubric", "tags")}


def teacher_messages(pattern: FailurePattern, source: Scenario, variant: int
                     ) -> list[dict[str, str]]:
    """The chat that asks the teacher for one new scenario like ``source``."""
    detail = next((e.detail for e in pattern.examples if e.scenario_id == source.id), pattern.kind)
    system = (
        "You write test scenarios for a model evaluation. Reply with exactly one JSON object "
        "and nothing else (no prose, no code fence) matching this JSON schema:\n"
        + json.dumps(REPLY_SCHEMA, sort_keys=True)
        + "\nThe rubric uses the same criteria types as the example's rubric. The reference is "
        "the correct answer to YOUR prompt, worked out anew (do not copy the example's), and it "
        "must pass your rubric.")
    user = (
        f"A model fails scenarios like this one (pattern {pattern.pattern}: {detail}).\n"
        f"Example scenario:\n{json.dumps(_scenario_view(source), sort_keys=True)}\n"
        f"Write new scenario number {variant + 1}: a different prompt testing the same skill.")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def messages_hash(messages: Sequence[dict[str, str]]) -> str:
    return hashlib.sha256(msgspec.json.encode(list(messages), order="sorted")).hexdigest()


def parse_reply(text: str) -> dict[str, Any]:
    """A teacher's reply as candidate fields; ValueError (why) for a malformed one."""
    data = text.strip().encode("utf-8", "surrogatepass")
    if len(data) > MAX_REPLY_BYTES:
        raise ValueError(f"reply of {len(data)} bytes; at most {MAX_REPLY_BYTES}")
    try:
        reply = msgspec.json.decode(data, type=TeacherReply)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise ValueError(f"malformed reply: {str(exc)[:200]}") from exc
    fields: dict[str, Any] = msgspec.to_builtins(reply)
    return fields


def load_generator(spec: str) -> Generator:
    """The callable named ``package.module:function``; ValidationError naming the field."""
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        function = getattr(module, attribute)
    except Exception as exc:  # an import error of the user's module is its own, reported
        raise ValidationError(
            f"[synthesis] generator {spec!r} cannot be loaded: {type(exc).__name__}: {exc}",
            data={"field": "synthesis.generator", "generator": spec}) from exc
    if not callable(function):
        raise ValidationError(f"[synthesis] generator {spec!r} is not callable",
                              data={"field": "synthesis.generator", "generator": spec})
    return function  # type: ignore[no-any-return]


def pattern_dict(pattern: FailurePattern) -> dict[str, Any]:
    return {"pattern": pattern.pattern, "criterion": pattern.criterion, "kind": pattern.kind,
            "scenario_ids": list(pattern.scenario_ids)}


def candidates_from_generator(generator: Generator, spec: str, pattern: FailurePattern,
                              sources: Sequence[Scenario], count: int) -> list[Candidate]:
    """Call the generator (blocking: a worker thread) and wrap what it returns."""
    views = [{"id": s.id, "domain": s.domain, **_scenario_view(s)} for s in sources]
    by_id = {s.id: s for s in sources}
    call_hash = hashlib.sha256(msgspec.json.encode(
        {"generator": spec, "pattern": pattern_dict(pattern), "sources": views, "count": count},
        order="sorted")).hexdigest()
    try:
        produced = list(itertools.islice(iter(generator(pattern_dict(pattern), views, count)),
                                         MAX_PER_COUNT * count))
    except Exception as exc:
        raise ValidationError(f"generator {spec!r} raised {type(exc).__name__}: {exc}",
                              data={"field": "synthesis.generator", "generator": spec}) from exc
    out = []
    for item in produced:
        source, error = sources[0], None
        if isinstance(item, dict) and "source_id" in item:
            item = dict(item)
            source_id = item.pop("source_id")
            if source_id in by_id:
                source = by_id[source_id]
            else:
                error = f"source_id {str(source_id)[:80]!r} is not one of the pattern's sources"
        out.append(Candidate(fields=item, source=source, pattern=pattern.pattern,
                             prompt_sha256=call_hash, error=error))
    return out
