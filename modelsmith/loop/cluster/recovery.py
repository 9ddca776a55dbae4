"""After a crash: which jobs the ledger says were running, and what is left of them on disk.

An eval or training job is *interrupted* when its ``*.started`` entry has no matching end
(``eval.finished``/``eval.failed``, ``iteration.advanced``/``train.failed``). The daemon resumes
each one under the same job id: an eval keeps the results already on disk, a training job
continues from its last checkpoint. A trainer child that outlived the daemon is stopped first
(SIGTERM, so it checkpoints; SIGKILL after a bound) so two trainers never write one work dir.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from modelsmith.loop.records.ledger import Ledger

log = structlog.get_logger("modelsmith.recovery")

TRAINER_MODULE = "modelsmith.gpu.trainer"


@dataclass(frozen=True, slots=True)
class InterruptedJob:
    kind: str  # "eval" | "train"
    job_id: str
    data: dict[str, Any]


def interrupted_jobs(ledger: Ledger) -> list[InterruptedJob]:
    open_jobs: dict[str, InterruptedJob] = {}
    for entry in ledger.entries():
        data = entry.data
        if entry.kind == "eval.started":
            open_jobs[data["job_id"]] = InterruptedJob("eval", data["job_id"], data)
        elif entry.kind == "train.started":
            open_jobs[data["job_id"]] = InterruptedJob("train", data["job_id"], data)
        elif entry.kind in ("eval.finished", "eval.failed", "train.failed"):
            open_jobs.pop(data.get("job_id", ""), None)
        elif entry.kind == "iteration.advanced":
            open_jobs.pop(data.get("train_job", ""), None)
    return list(open_jobs.values())


def _is_our_trainer(pid: int, work_dir: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    text = [part.decode(errors="replace") for part in cmdline]
    return TRAINER_MODULE in text and any(str(work_dir) in part for part in text)


def stop_orphaned_trainer(work_dir: Path, *, grace: float = 30.0) -> int | None:
    """Stop a trainer child left running by a crashed daemon. Returns its pid if there was one."""
    pid_file = work_dir / "trainer.pid"
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    if not _is_our_trainer(pid, work_dir):
        return None
    log.warning("stopping an orphaned trainer", pid=pid, work_dir=str(work_dir))
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return None
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _is_our_trainer(pid, work_dir):
            return pid
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return pid
