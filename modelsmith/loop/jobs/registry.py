"""Jobs: long work that an RPC call starts and returns at once (eval runs, training, ...).

A :class:`JobRegistry` is a service (``await tg.start(registry.run)``) that owns the task group
every job runs in. Each job keeps a numbered event log (a cursor for pulling, a wake-up for
watchers), a progress counter and, when it ends, a result or a typed error. Cancelling a job
cancels its scope; the job's own cleanup decides what is saved.
"""

from __future__ import annotations

import enum
import itertools
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import structlog

from modelsmith.clock import utc_stamp
from modelsmith.errors import ConflictError, ModelsmithError, NotFound, Unavailable
from modelsmith.rpc.errors import error_to_wire
from modelsmith.rpc.schema.jobs import JobEvent, JobSummary

log = structlog.get_logger("modelsmith.jobs")

MAX_EVENTS_KEPT = 20_000


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


def new_job_id() -> str:
    return secrets.token_hex(4)


@dataclass(eq=False)
class Job:
    """A job's live record. Only the registry and the job's own function change it."""

    job_id: str
    kind: str
    cluster: str
    log_path: str | None = None
    state: JobState = JobState.QUEUED
    created_at: str = field(default_factory=utc_stamp)
    started_at: str | None = None
    finished_at: str | None = None
    progress_done: int = 0
    progress_total: int | None = None
    message: str = ""
    queue_position: int | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    events: list[JobEvent] = field(default_factory=list)
    first_seq: int = 0
    _seq: itertools.count[int] = field(default_factory=itertools.count)
    _changed: anyio.Event = field(default_factory=anyio.Event)
    _scope: anyio.CancelScope | None = None
    _done: anyio.Event = field(default_factory=anyio.Event)

    def summary(self) -> JobSummary:
        return JobSummary(
            job_id=self.job_id,
            kind=self.kind,
            cluster=self.cluster,
            state=self.state.value,
            created_at=self.created_at,
            started_at=self.started_at,
            finished_at=self.finished_at,
            progress_done=self.progress_done,
            progress_total=self.progress_total,
            message=self.message,
            queue_position=self.queue_position,
            log=self.log_path,
            result=self.result,
            error=self.error,
        )

    def emit(self, kind: str, data: dict[str, Any]) -> JobEvent:
        """Record an event and wake every watcher. Synchronous: safe from any code on the loop."""
        event = JobEvent(job_id=self.job_id, seq=next(self._seq), time=time.time(), kind=kind, data=data)
        self.events.append(event)
        if len(self.events) > MAX_EVENTS_KEPT:
            drop = len(self.events) - MAX_EVENTS_KEPT
            del self.events[:drop]
            self.first_seq = self.events[0].seq
        changed, self._changed = self._changed, anyio.Event()
        changed.set()
        return event

    def set_progress(self, done: int, total: int | None = None, message: str | None = None) -> None:
        self.progress_done = done
        if total is not None:
            self.progress_total = total
        if message is not None:
            self.message = message
        self.emit("progress", {"done": done, "total": self.progress_total, "message": self.message})

    def set_queue_position(self, position: int | None) -> None:
        self.queue_position = position
        self.emit("state", {"state": self.state.value, "queue_position": position})

    def events_since(self, cursor: int, limit: int = 1000) -> list[JobEvent]:
        start = max(cursor - self.first_seq, 0)
        return self.events[start : start + limit]

    async def wait_finished(self) -> None:
        await self._done.wait()

    async def watch(self, cursor: int = 0) -> AsyncIterator[JobEvent]:
        """Every event from ``cursor`` on, live, until the job has finished and all are sent."""
        while True:
            changed = self._changed
            batch = self.events_since(cursor)
            for event in batch:
                yield event
                cursor = event.seq + 1
            if not batch and self.state.finished:
                return
            if not batch:
                await changed.wait()


JobFn = Callable[[Job], Awaitable[dict[str, Any] | None]]


class JobRegistry:
    """Owns every job's task. Start with ``await tg.start(registry.run)``."""

    def __init__(self, *, keep_finished: int = 500) -> None:
        self._jobs: dict[str, Job] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._keep_finished = keep_finished

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                self._tg = None

    def submit(
        self, kind: str, cluster: str, fn: JobFn, *, job_id: str | None = None, log_path: str | None = None
    ) -> Job:
        """Register a job and start ``fn(job)`` in the registry's task group. Returns at once."""
        if self._tg is None:
            raise Unavailable("the daemon is shutting down; no new jobs are accepted")
        job = Job(job_id=job_id or new_job_id(), kind=kind, cluster=cluster, log_path=log_path)
        if job.job_id in self._jobs:
            raise ConflictError(f"job {job.job_id} exists already", data={"job_id": job.job_id})
        self._jobs[job.job_id] = job
        self._prune()
        job.emit("state", {"state": job.state.value})
        self._tg.start_soon(self._run_job, job, fn, name=f"job-{job.kind}-{job.job_id}")
        return job

    async def _run_job(self, job: Job, fn: JobFn) -> None:
        with anyio.CancelScope() as scope:
            job._scope = scope
            job.state = JobState.RUNNING
            job.started_at = utc_stamp()
            job.emit("state", {"state": job.state.value})
            try:
                result = await fn(job)
            except ModelsmithError as exc:
                self._finish(job, JobState.FAILED, error=exc)
                return
            except Exception as exc:
                log.exception("job crashed", job_id=job.job_id, kind=job.kind)
                self._finish(job, JobState.FAILED, error=exc)
                return
            except BaseException:
                # Cancellation (job.cancel or shutdown): record it, then let it propagate.
                self._finish(job, JobState.CANCELLED)
                raise
            self._finish(job, JobState.SUCCEEDED, result=result)
        if scope.cancelled_caught and not job.state.finished:
            self._finish(job, JobState.CANCELLED)

    def _finish(
        self,
        job: Job,
        state: JobState,
        *,
        result: dict[str, Any] | None = None,
        error: BaseException | None = None,
    ) -> None:
        if job.state.finished:
            return
        job.state = state
        job.finished_at = utc_stamp()
        job.queue_position = None
        job.result = result
        if error is not None:
            wire = error_to_wire(error)
            job.error = {"code": wire.code, "message": wire.message, "data": wire.data or {}}
            job.message = wire.message
        if result is not None:
            job.emit("result", result)
        job.emit("state", {"state": state.value, "error": job.error})
        job._done.set()

    def _prune(self) -> None:
        finished = [j for j in self._jobs.values() if j.state.finished]
        for job in finished[: max(len(finished) - self._keep_finished, 0)]:
            del self._jobs[job.job_id]

    def get(self, job_id: str) -> Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise NotFound(f"no job {job_id!r}", data={"job_id": job_id}) from None

    def list_jobs(self, *, cluster: str | None = None, state: str | None = None) -> list[Job]:
        return [
            j
            for j in self._jobs.values()
            if (cluster is None or j.cluster == cluster) and (state is None or j.state.value == state)
        ]

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.state.finished:
            raise ConflictError(
                f"job {job_id} has already {job.state.value}", data={"job_id": job_id, "state": job.state.value}
            )
        if job._scope is not None:
            job._scope.cancel()
        return job

    def active(self) -> list[Job]:
        return [j for j in self._jobs.values() if not j.state.finished]
