"""The engine names a judge criterion may use: ``cluster`` or a named engine of the daemon."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Final

__all__ = ["JUDGE_CLUSTER_ENGINE", "unknown_judge_engine"]

JUDGE_CLUSTER_ENGINE: Final = "cluster"
"""The ``engine`` of a judge criterion that asks the cluster's own engine (its base model)."""


def unknown_judge_engine(criteria: Collection[Any],
                         judge_engines: Collection[str]) -> tuple[int, str, list[str]] | None:
    """The first criterion naming an ``engine`` that is neither ``cluster`` nor one of
    ``judge_engines``: (its index, the name, the names that exist); None when all are known."""
    for index, criterion in enumerate(criteria):
        name = getattr(criterion, "engine", None)
        if isinstance(name, str) and name != JUDGE_CLUSTER_ENGINE and name not in judge_engines:
            return index, name, sorted({JUDGE_CLUSTER_ENGINE, *judge_engines})
    return None
