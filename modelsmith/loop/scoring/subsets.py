"""Quick subsets: a deterministic, stratified sample of a scenario set (``eval --quick``)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from modelsmith.errors import ValidationError
from modelsmith.loop.scoring.scenarios import Scenario

__all__ = ["quick_subset"]



def _stratum(scenario: Scenario) -> tuple[str, str]:
    return scenario.set, scenario.tags[0] if scenario.tags else scenario.domain


def _rank(seed: str, text: str) -> str:
    return hashlib.sha256(f"{seed}\x00{text}".encode()).hexdigest()


def quick_subset(
    scenarios: Sequence[Scenario] | Iterable[Scenario], *, size: int, seed: str = "quick"
) -> list[Scenario]:
    """A deterministic, stratified subset of at most ``size`` scenarios, sorted by id.

    Strata are (set, first tag - or the domain when untagged). Every stratum gets one scenario
    when ``size`` allows, the rest is shared in proportion to stratum size; within a stratum the
    pick is by a hash of ``seed`` and id, so the same scenarios give the same subset whatever the
    order they come in.
    """
    if size < 1:
        raise ValidationError("a quick subset needs size >= 1", data={"field": "size"})
    pool = sorted({s.id: s for s in scenarios}.values(), key=lambda s: s.id)
    if size >= len(pool):
        return pool
    strata: dict[tuple[str, str], list[Scenario]] = {}
    for scenario in pool:
        strata.setdefault(_stratum(scenario), []).append(scenario)
    for members in strata.values():
        members.sort(key=lambda s: _rank(seed, s.id))
    # Strata in a fixed order: larger first, ties by a seeded hash of the stratum's name.
    order = sorted(strata, key=lambda key: (-len(strata[key]), _rank(seed, "/".join(key))))
    taken = dict.fromkeys(order, 0)
    for key in order[:size]:
        taken[key] = 1
    remaining = size - sum(taken.values())
    total = len(pool)
    while remaining > 0:
        # The stratum furthest below its proportional share, among those not exhausted.
        key = max(
            (k for k in order if taken[k] < len(strata[k])),
            key=lambda k: size * len(strata[k]) / total - taken[k],
        )
        taken[key] += 1
        remaining -= 1
    chosen = [s for key in order for s in strata[key][: taken[key]]]
    return sorted(chosen, key=lambda s: s.id)
