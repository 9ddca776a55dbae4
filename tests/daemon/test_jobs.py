"""JobRegistry with a real anyio task group: outcomes, cancellation, events by cursor and live."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from modelsmith.errors import ConflictError, EngineError, NotFound, Unavailable
from modelsmith.loop.jobs.registry import Job, JobRegistry, JobState
from modelsmith.rpc.schema.jobs import JobEvent

BOUND_S = 10


@asynccontextmanager
async def running_registry() -> AsyncIterator[JobRegistry]:
    """A registry served by a real task group (a context manager, not a fixture: the task group
    must be entered and left in the test's own task)."""
    jobs = JobRegistry()
    async with anyio.create_task_group() as tg:
        await tg.start(jobs.run)
        yield jobs
        tg.cancel_scope.cancel()


def states(job: Job) -> list[str]:
    return [e.data["state"] for e in job.events if e.kind == "state"]


async def test_a_job_that_returns_succeeds_with_its_result() -> None:
    async with running_registry() as registry:
        async def work(job: Job) -> dict[str, Any]:
            job.set_progress(1, 2)
            job.set_progress(2, 2, "done")
            return {"answer": 42}

        job = registry.submit("eval", "adtech", work)
        with anyio.fail_after(BOUND_S):
            await job.wait_finished()
        assert job.state is JobState.SUCCEEDED
        assert job.result == {"answer": 42}
        assert job.error is None
        assert (job.progress_done, job.progress_total, job.message) == (2, 2, "done")
        assert states(job) == ["queued", "running", "succeeded"]
        summary = job.summary()
        assert summary.state == "succeeded"
        assert summary.started_at is not None and summary.finished_at is not None


async def test_a_job_that_raises_a_modelsmith_error_fails_with_its_code() -> None:
    async with running_registry() as registry:
        async def work(job: Job) -> None:
            raise EngineError("the engine is not warm", data={"engine": "adtech"})

        job = registry.submit("eval", "adtech", work)
        with anyio.fail_after(BOUND_S):
            await job.wait_finished()
        assert job.state is JobState.FAILED
        assert job.error is not None
        assert job.error["code"] == EngineError.code == 1007
        assert job.error["data"]["engine"] == "adtech"
        assert states(job)[-1] == "failed"


async def test_a_job_that_crashes_fails_as_an_internal_error_without_leaking_its_text() -> None:
    async with running_registry() as registry:
        async def work(job: Job) -> None:
            raise RuntimeError("secret path /root/key")

        job = registry.submit("train", "adtech", work)
        with anyio.fail_after(BOUND_S):
            await job.wait_finished()
        assert job.state is JobState.FAILED
        assert job.error is not None and job.error["code"] == -32603
        assert "secret" not in str(job.error)


async def test_a_cancelled_job_ends_cancelled_and_runs_its_cleanup() -> None:
    async with running_registry() as registry:
        started = anyio.Event()
        cleaned_up = []

        async def work(job: Job) -> None:
            try:
                started.set()
                await anyio.sleep_forever()
            finally:
                cleaned_up.append(job.job_id)

        job = registry.submit("train", "adtech", work)
        with anyio.fail_after(BOUND_S):
            await started.wait()
            assert registry.cancel(job.job_id) is job
            await job.wait_finished()
        assert job.state is JobState.CANCELLED
        assert cleaned_up == [job.job_id]
        assert states(job) == ["queued", "running", "cancelled"]
        assert registry.active() == []


async def test_cancelling_a_finished_job_is_a_conflict() -> None:
    async with running_registry() as registry:
        async def work(job: Job) -> None:
            return None

        job = registry.submit("eval", "adtech", work)
        with anyio.fail_after(BOUND_S):
            await job.wait_finished()
        with pytest.raises(ConflictError) as caught:
            registry.cancel(job.job_id)
        assert caught.value.code == 1003


async def test_an_unknown_job_is_not_found() -> None:
    async with running_registry() as registry:
        with pytest.raises(NotFound) as caught:
            registry.get("nope")
        assert caught.value.code == 1001
        with pytest.raises(NotFound):
            registry.cancel("nope")


async def test_a_job_id_cannot_be_used_twice() -> None:
    async with running_registry() as registry:
        gate = anyio.Event()

        async def work(job: Job) -> None:
            await gate.wait()

        registry.submit("eval", "adtech", work, job_id="fixed")
        with pytest.raises(ConflictError):
            registry.submit("eval", "adtech", work, job_id="fixed")
        gate.set()


async def test_no_job_is_accepted_once_the_registry_has_stopped() -> None:
    jobs = JobRegistry()
    async with anyio.create_task_group() as tg:
        await tg.start(jobs.run)
        tg.cancel_scope.cancel()

    async def work(job: Job) -> None:
        return None

    with pytest.raises(Unavailable) as caught:
        jobs.submit("eval", "adtech", work)
    assert caught.value.code == 1011


async def test_list_filters_by_cluster_and_state() -> None:
    async with running_registry() as registry:
        gate = anyio.Event()

        async def waits(job: Job) -> None:
            await gate.wait()

        async def quick(job: Job) -> None:
            return None

        running = registry.submit("eval", "adtech", waits)
        done = registry.submit("eval", "legal", quick)
        with anyio.fail_after(BOUND_S):
            await done.wait_finished()
        assert registry.list_jobs(cluster="legal") == [done]
        assert registry.list_jobs(state="succeeded") == [done]
        assert registry.active() == [running]
        gate.set()


async def test_events_are_pulled_by_cursor_in_order() -> None:
    async with running_registry() as registry:
        async def work(job: Job) -> dict[str, Any]:
            for step in range(5):
                job.set_progress(step + 1, 5)
            return {"steps": 5}

        job = registry.submit("eval", "adtech", work)
        with anyio.fail_after(BOUND_S):
            await job.wait_finished()
        everything = job.events_since(0)
        assert [e.seq for e in everything] == list(range(len(everything)))
        assert [e.kind for e in everything] == ["state", "state"] + ["progress"] * 5 + ["result", "state"]
        page = job.events_since(3, limit=2)
        assert [e.seq for e in page] == [3, 4]
        assert job.events_since(len(everything)) == []


async def test_watch_streams_live_events_in_order_from_a_cursor() -> None:
    async with running_registry() as registry:
        proceed = anyio.Event()

        async def work(job: Job) -> dict[str, Any]:
            job.set_progress(1, 3)
            await proceed.wait()
            job.set_progress(2, 3)
            job.emit("log", {"line": "halfway"})
            job.set_progress(3, 3)
            return {"ok": True}

        job = registry.submit("train", "adtech", work)
        seen: list[JobEvent] = []
        first_live = anyio.Event()

        async def watcher() -> None:
            async for event in job.watch(cursor=1):
                seen.append(event)
                if event.kind == "progress":
                    first_live.set()

        with anyio.fail_after(BOUND_S):
            async with anyio.create_task_group() as tg:
                tg.start_soon(watcher)
                await first_live.wait()
                # The job is still running: what follows can only reach the watcher live.
                assert job.state is JobState.RUNNING
                proceed.set()
        assert [e.seq for e in seen] == list(range(1, 1 + len(seen)))
        assert [e.kind for e in seen] == ["state", "progress", "progress", "log", "progress", "result", "state"]
        assert seen[-1].data["state"] == "succeeded"


async def test_watching_a_finished_job_replays_its_events_and_ends() -> None:
    async with running_registry() as registry:
        async def work(job: Job) -> None:
            return None

        job = registry.submit("eval", "adtech", work)
        with anyio.fail_after(BOUND_S):
            await job.wait_finished()
            replay = [event async for event in job.watch(0)]
        assert replay == job.events
