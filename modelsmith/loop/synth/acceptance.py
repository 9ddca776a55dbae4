"""What a reviewer signs to accept synthetic scenarios into core (standard library only: the CLI
computes it on its hot path).

The digest binds the cluster and each accepted scenario's id and content hash
(:func:`modelsmith.loop.scoring.scenarios.scenario_hash` of the synthetic scenario as listed by
``synth.list``), so a statement signed for one set of scenarios never accepts another, nor the
same ids after their content changed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

__all__ = ["ACCEPT_REQUEST_ID", "acceptance_digest"]

ACCEPT_REQUEST_ID = "scenarios.accept"
"""The ``request_id`` of an acceptance statement (the digest names what is accepted)."""


def acceptance_digest(cluster: str, scenarios: Iterable[tuple[str, str]]) -> str:
    """sha256 (hex) of the canonical JSON of ``cluster`` and the sorted ``(id, sha256)`` pairs."""
    body = {"cluster": cluster,
            "scenarios": [{"id": i, "sha256": h} for i, h in sorted(set(scenarios))]}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
