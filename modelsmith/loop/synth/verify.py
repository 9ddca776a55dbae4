"""Verification of synthetic candidates: nothing is kept that a hand-written file could not be.

Each candidate (a teacher's parsed reply, or one dict of a programmatic generator) goes through,
in this order, and lands in exactly one count of :class:`SynthCounts`:

1. **invalid** (``dropped_invalid``): it is not a JSON object of exactly ``prompt``,
   ``reference``, ``rubric`` and optional ``tags`` (and, from a generator, ``source_id``); or the
   scenario it makes does not load under the loader and limits of hand-written files
   (:func:`~modelsmith.loop.scoring.scenarios.parse_scenarios`, the cluster's prompt limit); or
   it has no reference; or its rubric's criteria kinds are not its source scenario's; or its
   rubric needs a judge (its reference cannot be checked here).
2. **near held-out** (``refused_near_held_out``): its prompt is a held-out prompt (same prompt
   hash) or a near-duplicate of one (:mod:`~modelsmith.loop.synth.similarity`). A leakage
   attempt: refused, counted, never written.
3. **duplicate** (``dropped_duplicate``): the same, against every core and synthetic prompt and
   every candidate kept before it in this job.
4. **reference fails** (``dropped_reference_fails``): its reference, scored as an answer by its
   own rubric, does not pass.

What is left is ``kept``: a :class:`~modelsmith.loop.scoring.scenarios.Scenario` of set
``synthetic`` whose id is derived from its content (``syn-`` and 16 hex digits).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import msgspec

from modelsmith.errors import ModelsmithError
from modelsmith.loop.scoring.rubric import score
from modelsmith.loop.scoring.scenarios import Scenario, ScenarioCatalog, parse_scenarios
from modelsmith.loop.synth.similarity import PromptIndex

__all__ = ["CANDIDATE_FIELDS", "Candidate", "Rejection", "SynthCounts", "Verified", "verify"]

CANDIDATE_FIELDS: Final = frozenset({"prompt", "reference", "rubric", "tags"})
Reason = Literal["invalid", "near_held_out", "duplicate", "reference_fails"]


@dataclass(frozen=True)
class Candidate:
    """One proposed scenario: its fields as received (or why there are none), its source."""

    fields: Any
    source: Scenario
    pattern: str
    prompt_sha256: str  # the generation prompt's hash (provenance)
    error: str | None = None  # the reply could not be read at all


@dataclass
class SynthCounts:
    generated: int = 0
    dropped_invalid: int = 0
    dropped_reference_fails: int = 0
    dropped_duplicate: int = 0
    refused_near_held_out: int = 0
    kept: int = 0

    def add(self, other: SynthCounts) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(frozen=True)
class Rejection:
    index: int
    reason: Reason
    detail: str
    match: str | None = None  # the scenario it duplicates or comes too close to


@dataclass
class Verified:
    kept: list[tuple[Scenario, Candidate]] = field(default_factory=list)
    counts: SynthCounts = field(default_factory=SynthCounts)
    rejections: list[Rejection] = field(default_factory=list)


def _content_id(value: dict[str, Any]) -> str:
    body = msgspec.json.encode({k: value.get(k) for k in ("prompt", "reference", "rubric")},
                               order="sorted")
    return "syn-" + hashlib.sha256(body).hexdigest()[:16]


def _build(candidate: Candidate, index: int, max_prompt_bytes: int | None) -> Scenario:
    """The candidate as a loaded scenario; ValueError (why) when it is not one."""
    if candidate.error is not None:
        raise ValueError(candidate.error)
    value = candidate.fields
    if not isinstance(value, dict):
        raise ValueError("a candidate is a JSON object")
    unknown = sorted(str(k) for k in value if k not in CANDIDATE_FIELDS)
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}")
    if value.get("reference") is None:
        raise ValueError("a synthetic scenario needs a reference")
    tags = value.get("tags", [])
    if not isinstance(tags, list):
        raise ValueError("tags is a list")
    scenario = {
        "id": _content_id(value), "set": "synthetic", "domain": candidate.source.domain,
        "tags": [*tags, "synthetic"], "prompt": value.get("prompt"),
        "reference": value.get("reference"), "rubric": value.get("rubric"),
        "weight": candidate.source.weight,
    }
    try:
        data = msgspec.json.encode(scenario) + b"\n"
    except (TypeError, OverflowError, msgspec.EncodeError) as exc:
        raise ValueError(f"not JSON data: {exc}") from exc
    try:
        (loaded,) = parse_scenarios(data, filename=f"candidate-{index}.jsonl",
                                    default_set="synthetic", max_prompt_bytes=max_prompt_bytes)
    except ModelsmithError as exc:
        raise ValueError(f"{exc.data.get('field', '')}: {exc.message}") from exc
    kinds = {c.kind for c in loaded.rubric.criteria}
    source_kinds = {c.kind for c in candidate.source.rubric.criteria}
    if kinds != source_kinds:
        raise ValueError(f"criteria kinds {sorted(kinds)} are not the source's {sorted(source_kinds)}")
    if loaded.rubric.judge_indices():
        raise ValueError("a judged rubric: its reference cannot be checked without a judge")
    return loaded


def verify(candidates: Sequence[Candidate], catalog: ScenarioCatalog, *, threshold: float,
           max_prompt_bytes: int | None = None) -> Verified:
    """Sort ``candidates`` into kept and dropped (blocking: run it in a worker thread)."""
    held_out = PromptIndex.of(catalog.held_out.scenarios, threshold)
    others = PromptIndex.of((s for s in catalog.all() if s.set != "held-out"), threshold)
    out = Verified()
    for index, candidate in enumerate(candidates):
        out.counts.generated += 1
        try:
            scenario = _build(candidate, index, max_prompt_bytes)
        except ValueError as exc:
            out.counts.dropped_invalid += 1
            out.rejections.append(Rejection(index, "invalid", str(exc)[:300]))
            continue
        leak = held_out.near(scenario)
        if leak is not None:
            out.counts.refused_near_held_out += 1
            out.rejections.append(Rejection(
                index, "near_held_out",
                f"{'the same prompt as' if leak.exact else f'{leak.similarity:g}% similar to'} "
                f"a held-out scenario", leak.scenario_id))
            continue
        copy = others.near(scenario)
        if copy is not None:
            out.counts.dropped_duplicate += 1
            out.rejections.append(Rejection(
                index, "duplicate",
                f"{'the same prompt as' if copy.exact else f'{copy.similarity:g}% similar to'} "
                f"{copy.set} scenario {copy.scenario_id}", copy.scenario_id))
            continue
        graded = score(scenario.rubric, scenario.reference or "", scenario.reference)
        if not graded.passed or graded.scoring_error:
            out.counts.dropped_reference_fails += 1
            out.rejections.append(Rejection(
                index, "reference_fails",
                f"its reference scores {graded.score:.2f} < pass mark {graded.pass_mark:.2f}"))
            continue
        others.add(scenario)
        out.counts.kept += 1
        out.kept.append((scenario, candidate))
    return out
