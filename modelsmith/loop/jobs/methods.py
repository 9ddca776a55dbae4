"""job.* methods: list, get, events (pull by cursor), watch (push), cancel."""

from __future__ import annotations

from modelsmith.loop.jobs.registry import JobRegistry
from modelsmith.rpc.dispatch import MethodTable
from modelsmith.rpc.schema.jobs import (
    JOB_EVENT,
    JobCancelParams,
    JobEvents,
    JobEventsParams,
    JobList,
    JobListParams,
    JobRef,
    JobSummary,
    JobWatchParams,
    JobWatchStarted,
)
from modelsmith.rpc.server import CallContext


def register_job_methods(table: MethodTable, jobs: JobRegistry) -> None:
    async def job_list(params: JobListParams, ctx: CallContext) -> JobList:
        return JobList(jobs=[j.summary() for j in jobs.list_jobs(cluster=params.cluster, state=params.state)])

    async def job_get(params: JobRef, ctx: CallContext) -> JobSummary:
        return jobs.get(params.job_id).summary()

    async def job_events(params: JobEventsParams, ctx: CallContext) -> JobEvents:
        job = jobs.get(params.job_id)
        events = job.events_since(params.cursor, params.limit)
        cursor = events[-1].seq + 1 if events else max(params.cursor, job.first_seq)
        return JobEvents(job=job.summary(), events=events, cursor=cursor)

    async def job_watch(params: JobWatchParams, ctx: CallContext) -> JobWatchStarted:
        job = jobs.get(params.job_id)
        connection = ctx.connection

        async def forward() -> None:
            async for event in job.watch(params.cursor):
                if connection.closed:
                    return
                await connection.notify(JOB_EVENT, event)

        connection.start_subscription(forward)
        return JobWatchStarted(job=job.summary(), cursor=params.cursor)

    async def job_cancel(params: JobCancelParams, ctx: CallContext) -> JobSummary:
        return jobs.cancel(params.job_id).summary()

    table.add("job.list", JobListParams, job_list, "Jobs, optionally of one cluster or state.", inline=True)
    table.add("job.get", JobRef, job_get, "One job's summary.", inline=True)
    table.add("job.events", JobEventsParams, job_events, "A job's events from a cursor (pull).", inline=True)
    table.add("job.watch", JobWatchParams, job_watch, "Stream a job's events as job.event notifications.")
    table.add("job.cancel", JobCancelParams, job_cancel, "Cancel a queued or running job.")
