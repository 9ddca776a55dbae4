"""Near-duplicate prompts: normalised character similarity (rapidfuzz), against a fixed set.

A prompt is normalised with rapidfuzz's ``utils.default_process`` (lower case, every
non-alphanumeric character a space, trimmed) and compared with ``fuzz.ratio``: the normalised
Indel similarity of the two strings, 0-100. Two prompts at or above the threshold
(``[synthesis] near_duplicate_threshold``, default :data:`NEAR_DUPLICATE_THRESHOLD`) are
near-duplicates. Punctuation, case and spacing never make a copy look new; a change of one
short word in a short prompt still does (``us-east`` to ``us-west`` in the rtb-pricing prompts
scores about 97: a near-duplicate; a region no scenario uses scores about 85: not one).

A chat prompt is compared as its ``role: content`` text. Prompts are clipped to
:data:`COMPARED_CHARS` before comparing, so one comparison's time is bounded.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from rapidfuzz import fuzz, process, utils

from modelsmith.loop.scoring.scenarios import Scenario, prompt_hash, prompt_text

__all__ = ["COMPARED_CHARS", "NEAR_DUPLICATE_THRESHOLD", "Match", "PromptIndex", "normalise"]

NEAR_DUPLICATE_THRESHOLD: Final = 90.0
COMPARED_CHARS: Final = 4096


def normalise(text: str) -> str:
    """What is compared: lower case, alphanumerics separated by single spaces, clipped."""
    return " ".join(utils.default_process(text[: COMPARED_CHARS * 2]).split())[:COMPARED_CHARS]


@dataclass(frozen=True)
class Match:
    """The closest indexed prompt: its scenario id and set, and the similarity (0-100)."""

    scenario_id: str
    set: str
    similarity: float
    exact: bool


@dataclass
class PromptIndex:
    """Prompts of a fixed set of scenarios, searched by exact prompt hash and by similarity."""

    threshold: float = NEAR_DUPLICATE_THRESHOLD
    _texts: list[str] = field(default_factory=list)
    _owners: list[tuple[str, str]] = field(default_factory=list)
    _hashes: dict[str, tuple[str, str]] = field(default_factory=dict)

    @classmethod
    def of(cls, scenarios: Iterable[Scenario], threshold: float) -> PromptIndex:
        index = cls(threshold=threshold)
        for scenario in scenarios:
            index.add(scenario)
        return index

    def add(self, scenario: Scenario) -> None:
        owner = (scenario.id, scenario.set)
        self._texts.append(normalise(prompt_text(scenario)))
        self._owners.append(owner)
        self._hashes.setdefault(prompt_hash(scenario), owner)

    def __len__(self) -> int:
        return len(self._owners)

    def near(self, scenario: Scenario) -> Match | None:
        """The indexed prompt this one copies (same prompt hash) or is at least ``threshold``
        similar to (the most similar); None when there is none."""
        owner = self._hashes.get(prompt_hash(scenario))
        if owner is not None:
            return Match(owner[0], owner[1], 100.0, True)
        if not self._texts:
            return None
        found = process.extractOne(normalise(prompt_text(scenario)), self._texts,
                                   scorer=fuzz.ratio, score_cutoff=self.threshold)
        if found is None:
            return None
        _, similarity, position = found
        scenario_id, set_name = self._owners[position]
        return Match(scenario_id, set_name, round(float(similarity), 2), False)
