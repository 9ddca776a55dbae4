"""job.* params and results, and the ``job.event`` notification."""

from __future__ import annotations

from typing import Any

import msgspec

from modelsmith.rpc.dispatch import MutatingParams, QueryParams

JOB_EVENT = "job.event"


class JobSummary(msgspec.Struct, kw_only=True):
    job_id: str
    kind: str
    cluster: str
    state: str  # queued | running | succeeded | failed | cancelled
    created_at: str
    started_at: str | None
    finished_at: str | None
    progress_done: int
    progress_total: int | None
    message: str
    queue_position: int | None
    log: str | None
    result: dict[str, Any] | None
    error: dict[str, Any] | None


class JobEvent(msgspec.Struct, kw_only=True):
    """One event of a job, numbered by ``seq`` (a cursor for pulling)."""

    job_id: str
    seq: int
    time: float
    kind: str  # state | progress | metric | log | result
    data: dict[str, Any]


class JobListParams(QueryParams):
    cluster: str | None = None
    state: str | None = None


class JobList(msgspec.Struct, kw_only=True):
    jobs: list[JobSummary]


class JobRef(QueryParams):
    job_id: str


class JobCancelParams(MutatingParams):
    job_id: str


class JobEventsParams(QueryParams):
    job_id: str
    cursor: int = 0
    limit: int = 1000


class JobEvents(msgspec.Struct, kw_only=True):
    job: JobSummary
    events: list[JobEvent]
    cursor: int


class JobWatchParams(QueryParams):
    job_id: str
    cursor: int = 0


class JobWatchStarted(msgspec.Struct, kw_only=True):
    job: JobSummary
    cursor: int
