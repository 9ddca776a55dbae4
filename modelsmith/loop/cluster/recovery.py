"""After a crash: which jobs the ledger says were running, and what is left of them on disk.

An eval or training job is *interrupted* when its ``*.started`` entry has no matching end
(``eval.finished``/``eval.failed``, ``iteration.advanced``/``train.failed``): the reduced
:class:`~modelsmith.loop.cluster.state.ClusterState` still lists it as running. The daemon resumes
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
from typing import Literal

import structlog

from modelsmith.loop.cluster.state import ClusterState
from modelsmith.loop.records.events import EvalStarted, TrainStarted

log = structlog.get_logger("modelsmith.recovery")

TRAINER_MODULE = "modelsmith.gpu.trainer"


@dataclass(frozen=True, slots=True)
class InterruptedJob:
    """A job whose start the ledger recorded and whose end it did not."""

    kind: Literal["eval", "train"]
    job_id: str
    started: EvalStarted | TrainStarted


def interrupted_jobs(state: ClusterState) -> list[InterruptedJob]:
    """The jobs the reduced state still counts as running (at start: interrupted by a crash)."""
    jobs = [InterruptedJob("eval", job_id, started) for job_id, started in state.running_evals.items()]
    jobs += [InterruptedJob("train", job_id, started)
             for job_id, started in state.running_trains.items()]
    return jobs


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


def records_without_ledger(cluster_root: Path) -> list[str]:
    """What a cluster holds that only a ledger can vouch for (promotion records, adapters, evals).

    A cluster with any of these and no ``ledger.jsonl`` lost its ledger: that is damage, never a
    fresh start (champion and approval history would be gone without a word).
    """
    found: list[str] = []
    for pattern in ("promotions/*.json", "adapters/iter-*", "evals/*/summary.json"):
        found += sorted(p.relative_to(cluster_root).as_posix() for p in cluster_root.glob(pattern))
    return found
