"""Follow a job over the socket: a progress bar on a terminal, nothing on a pipe."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from modelsmith.rpc.client import RpcClient
from modelsmith.rpc.schema.jobs import JOB_EVENT, JobEvent, JobSummary, JobWatchStarted

FINISHED = {"succeeded", "failed", "cancelled"}


def _bar(done: int, total: int | None, message: str, width: int = 30) -> str:
    if not total:
        return f"\r  {done} {message}"[:100]
    filled = int(width * done / total)
    return f"\r  [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {message}"[:110]


def follow_job(
    socket_path: str | Path | None,
    job_id: str,
    *,
    timeout: float | None = None,
    on_event: Callable[[JobEvent], None] | None = None,
    show_progress: bool | None = None,
) -> JobSummary:
    """Block until the job ends; returns its final summary."""
    show = sys.stderr.isatty() if show_progress is None else show_progress
    with RpcClient(socket_path, timeout=timeout) as rpc:
        rpc.call("job.watch", {"job_id": job_id, "cursor": 0}, result_type=JobWatchStarted)
        for notice in rpc.notifications():
            if notice.method != JOB_EVENT:
                continue
            event = notice.decode(JobEvent)
            if on_event is not None:
                on_event(event)
            if show and event.kind == "progress":
                sys.stderr.write(_bar(event.data.get("done", 0), event.data.get("total"), event.data.get("message") or ""))
                sys.stderr.flush()
            if event.kind == "state" and event.data.get("state") in FINISHED:
                break
        if show:
            sys.stderr.write("\n")
        return rpc.call("job.get", {"job_id": job_id}, result_type=JobSummary)
