"""loop.* params and results."""

from __future__ import annotations

from typing import Any

import msgspec

from modelsmith.rpc.dispatch import MutatingParams, QueryParams


class LoopControlParams(MutatingParams):
    cluster: str


class LoopStatusParams(QueryParams):
    cluster: str | None = None


class LoopStatus(msgspec.Struct, kw_only=True):
    cluster: str
    state: str
    active: bool
    reason: str
    paused_from: str | None
    current_job: str | None
    run: dict[str, Any]


class LoopStatuses(msgspec.Struct, kw_only=True):
    loops: list[LoopStatus]
