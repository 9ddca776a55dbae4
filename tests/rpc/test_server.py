"""RpcServer in this process on a real Unix socket, driven by the real async client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from support.daemon_process import short_tmp_dir

from modelsmith.daemon.listener import bind_unix_socket
from modelsmith.errors import InternalError, InvalidParams, MethodNotFound, ValidationError
from modelsmith.loop.jobs.methods import register_job_methods
from modelsmith.loop.jobs.registry import Job, JobRegistry
from modelsmith.rpc.client import AsyncRpcClient, connect
from modelsmith.rpc.dispatch import Empty, MethodTable, QueryParams
from modelsmith.rpc.peercred import PeerPolicy
from modelsmith.rpc.schema.jobs import JOB_EVENT, JobEvent
from modelsmith.rpc.server import CallContext, RpcServer, ServerLimits

BOUND_S = 10


class Named(QueryParams):
    name: str


@asynccontextmanager
async def serving(
    table: MethodTable, jobs: JobRegistry | None = None, limits: ServerLimits | None = None
) -> AsyncIterator[AsyncRpcClient]:
    """Serve ``table`` (and run ``jobs``) on a fresh socket; yields a connected client."""
    with short_tmp_dir() as base:
        sock = bind_unix_socket(base / "run" / "rpc.sock")
        listener = await anyio.abc.SocketListener.from_socket(sock)
        server = RpcServer(table, policy=PeerPolicy.for_current_process(), limits=limits)
        with anyio.fail_after(BOUND_S):
            async with anyio.create_task_group() as tg:
                if jobs is not None:
                    await tg.start(jobs.run)
                await tg.start(server.serve, listener)
                async with connect(base / "run" / "rpc.sock") as client:
                    yield client
                tg.cancel_scope.cancel()


def failing_table() -> MethodTable:
    table = MethodTable()

    async def crash(params: Empty, ctx: CallContext) -> None:
        raise RuntimeError("secret detail /root/.ssh/id_ed25519")

    async def invalid(params: Named, ctx: CallContext) -> None:
        raise ValidationError(
            f"{params.name}: bad", data={"file": "/h/adtech/cluster.toml", "field": "model.base"}
        )

    table.add("test.crash", Empty, crash)
    table.add("test.invalid", Named, invalid)
    return table


async def test_a_crashing_handler_becomes_an_internal_error_without_its_text() -> None:
    async with serving(failing_table()) as client:
        with pytest.raises(InternalError) as caught:
            await client.call("test.crash")
    assert caught.value.code == -32603
    assert caught.value.data["type"] == "RuntimeError"
    assert "secret" not in caught.value.message
    assert "Traceback" not in caught.value.message


async def test_a_validation_error_reaches_the_client_typed_with_file_and_field() -> None:
    async with serving(failing_table()) as client:
        with pytest.raises(ValidationError) as caught:
            await client.call("test.invalid", {"name": "adtech"})
    assert caught.value.code == 1002
    assert caught.value.data == {"file": "/h/adtech/cluster.toml", "field": "model.base"}


async def test_unknown_methods_and_bad_params_are_typed_errors_on_a_live_connection() -> None:
    async with serving(failing_table()) as client:
        with pytest.raises(MethodNotFound):
            await client.call("test.nothing")
        with pytest.raises(InvalidParams):
            await client.call("test.invalid", {"name": 3})
        with pytest.raises(ValidationError):
            await client.call("test.invalid", {"name": "still-connected"})


async def test_requests_on_one_connection_run_concurrently_and_replies_match_their_ids() -> None:
    table = MethodTable()
    fast_done = anyio.Event()

    async def slow(params: Empty, ctx: CallContext) -> str:
        # Finishes only after a later request on the same connection has been answered.
        await fast_done.wait()
        return "slow"

    async def fast(params: Empty, ctx: CallContext) -> str:
        return "fast"

    table.add("test.slow", Empty, slow)
    table.add("test.fast", Empty, fast)
    answers: list[str] = []

    async with serving(table) as client:

        async def call_slow() -> None:
            answers.append(await client.call("test.slow", result_type=str))

        async with anyio.create_task_group() as tg:
            tg.start_soon(call_slow)
            answers.append(await client.call("test.fast", result_type=str))
            fast_done.set()
    assert answers == ["fast", "slow"]


async def gated_job(jobs: JobRegistry, proceed: anyio.Event, steps: int = 3) -> Job:
    async def work(job: Job) -> dict[str, Any]:
        await proceed.wait()
        for step in range(steps):
            job.set_progress(step + 1, steps)
        return {"steps": steps}

    return jobs.submit("eval", "adtech", work, job_id="job1")


async def test_job_watch_streams_job_events_as_notifications_in_order() -> None:
    jobs = JobRegistry()
    table = MethodTable()
    register_job_methods(table, jobs)
    async with serving(table, jobs) as client:
        proceed = anyio.Event()
        job = await gated_job(jobs, proceed)
        started: dict[str, Any] = await client.call("job.watch", {"job_id": job.job_id})
        assert started["job"]["job_id"] == "job1"
        proceed.set()
        events: list[JobEvent] = []
        async for notice in client.notices:
            assert notice.method == JOB_EVENT
            events.append(notice.decode(JobEvent))
            if events[-1].kind == "state" and events[-1].data["state"] == "succeeded":
                break
    assert [e.seq for e in events] == list(range(len(events)))
    assert [e.kind for e in events] == ["state", "state", "progress", "progress", "progress", "result", "state"]
    assert {e.job_id for e in events} == {"job1"}


async def test_job_events_are_pulled_page_by_page_with_a_cursor() -> None:
    jobs = JobRegistry()
    table = MethodTable()
    register_job_methods(table, jobs)
    async with serving(table, jobs) as client:
        proceed = anyio.Event()
        proceed.set()
        job = await gated_job(jobs, proceed, steps=4)
        await job.wait_finished()
        seqs: list[int] = []
        cursor = 0
        while True:
            page: dict[str, Any] = await client.call("job.events", {"job_id": "job1", "cursor": cursor, "limit": 3})
            if not page["events"]:
                break
            seqs += [e["seq"] for e in page["events"]]
            assert page["cursor"] == seqs[-1] + 1
            cursor = page["cursor"]
        assert page["job"]["state"] == "succeeded"
        assert seqs == list(range(len(job.events)))


async def test_job_cancel_over_the_socket_cancels_a_running_job() -> None:
    jobs = JobRegistry()
    table = MethodTable()
    register_job_methods(table, jobs)
    async with serving(table, jobs) as client:
        job = await gated_job(jobs, anyio.Event())
        await client.call("job.cancel", {"job_id": "job1"})
        await job.wait_finished()
        assert (await client.call("job.get", {"job_id": "job1"}))["state"] == "cancelled"
        listed: dict[str, Any] = await client.call("job.list", {"state": "cancelled"})
        assert [j["job_id"] for j in listed["jobs"]] == ["job1"]


async def test_a_watching_connection_outlives_the_idle_timeout() -> None:
    idle = 0.2
    jobs = JobRegistry()
    table = MethodTable()
    register_job_methods(table, jobs)

    async def slow_work(job: Job) -> dict[str, Any]:
        # The job's own work takes several idle timeouts; the watcher must stay connected.
        await anyio.sleep(idle * 4)
        return {"ok": True}

    async with serving(table, jobs, ServerLimits(idle_timeout=idle)) as client:
        jobs.submit("train", "adtech", slow_work, job_id="slow")
        await client.call("job.watch", {"job_id": "slow"})
        kinds = []
        async for notice in client.notices:
            event = notice.decode(JobEvent)
            kinds.append(event.kind)
            if event.kind == "state" and event.data["state"] == "succeeded":
                break
        assert kinds[-2:] == ["result", "state"]
        assert (await client.call("job.get", {"job_id": "slow"}))["state"] == "succeeded"


def test_the_listener_socket_is_created_0660_in_a_0750_directory(short_tmp: Path) -> None:
    path = short_tmp / "run" / "rpc.sock"
    sock = bind_unix_socket(path)
    try:
        assert path.stat().st_mode & 0o777 == 0o660
        assert path.parent.stat().st_mode & 0o777 == 0o750
    finally:
        sock.close()


async def test_replies_larger_than_the_socket_buffer_arrive_whole_even_several_at_once() -> None:
    table = MethodTable()

    async def big(params: Named, ctx: CallContext) -> str:
        # Far above a Unix socket's buffer: the write is partial and the rest must follow in order.
        return params.name * 1_000_000

    table.add("test.big", Named, big)
    answers: dict[str, str] = {}
    async with serving(table) as client:

        async def fetch(letter: str) -> None:
            answers[letter] = await client.call("test.big", {"name": letter}, result_type=str)

        async with anyio.create_task_group() as tg:
            for letter in "abcd":
                tg.start_soon(fetch, letter)
    assert answers == {letter: letter * 1_000_000 for letter in "abcd"}
