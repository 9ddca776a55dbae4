"""The per-cluster supervisor: an explicit state machine that runs the loop by itself.

    idle ──► evaluating ──► diagnosing ──► training ──► evaluating ──► ... ──► awaiting_approval
      ▲           │ gate passes: promotion request ──────────────────────────────────┘   │
      └───────────┴──────────── stop / limits / approved ◄───────────────────────────────┘
    any running state ──► paused ──► (back where it was);  any state ──► failed (with a reason)

Every transition is a ``loop.transition`` ledger entry carrying the run's counters, so a
restarted daemon puts the supervisor back where it was; the interrupted eval or training job is
resumed under its own job id (results kept, training from its checkpoint), never duplicated.
One supervisor's failure fails its cluster only.
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.abc
import structlog

from modelsmith.errors import ConflictError, GateFailed, ModelsmithError
from modelsmith.loop.cluster.fleet import ClusterRuntime
from modelsmith.loop.cluster.recovery import InterruptedJob, interrupted_jobs, stop_orphaned_trainer
from modelsmith.loop.jobs.registry import Job, JobState

log = structlog.get_logger("modelsmith.supervisor")

APPROVAL_POLL_S = 0.5


class LoopState(enum.StrEnum):
    IDLE = "idle"
    EVALUATING = "evaluating"
    DIAGNOSING = "diagnosing"
    TRAINING = "training"
    AWAITING_APPROVAL = "awaiting_approval"
    PAUSED = "paused"
    FAILED = "failed"


_RUNNING = {LoopState.EVALUATING, LoopState.DIAGNOSING, LoopState.TRAINING, LoopState.AWAITING_APPROVAL}
TRANSITIONS: dict[LoopState, frozenset[LoopState]] = {
    LoopState.IDLE: frozenset({LoopState.EVALUATING, LoopState.AWAITING_APPROVAL, LoopState.PAUSED, LoopState.FAILED}),
    LoopState.EVALUATING: frozenset({LoopState.DIAGNOSING, LoopState.AWAITING_APPROVAL, LoopState.IDLE,
                                     LoopState.PAUSED, LoopState.FAILED}),
    LoopState.DIAGNOSING: frozenset({LoopState.TRAINING, LoopState.IDLE, LoopState.PAUSED, LoopState.FAILED}),
    LoopState.TRAINING: frozenset({LoopState.EVALUATING, LoopState.IDLE, LoopState.PAUSED, LoopState.FAILED}),
    LoopState.AWAITING_APPROVAL: frozenset({LoopState.IDLE, LoopState.DIAGNOSING, LoopState.PAUSED, LoopState.FAILED}),
    LoopState.PAUSED: frozenset({LoopState.IDLE, *_RUNNING, LoopState.FAILED}),
    LoopState.FAILED: frozenset({LoopState.IDLE, LoopState.EVALUATING}),
}


class IllegalTransition(ConflictError):
    name = "illegal_transition"


@dataclass
class RunCounters:
    """What one run of the loop has done; stored in every transition so it survives restarts."""

    iterations: int = 0
    best_composite: float | None = None
    without_improvement: int = 0
    device_seconds_today: float = 0.0
    day: str = field(default_factory=lambda: datetime.now(UTC).date().isoformat())
    last_eval_tag: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"iterations": self.iterations, "best_composite": self.best_composite,
                "without_improvement": self.without_improvement,
                "device_seconds_today": round(self.device_seconds_today, 3), "day": self.day,
                "last_eval_tag": self.last_eval_tag}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunCounters:
        return cls(**{k: data[k] for k in cls().as_dict() if k in data})


@dataclass
class LoopDeps:
    """The services a supervisor drives (injected by the daemon)."""

    start_eval: Callable[[ClusterRuntime, str | None], Awaitable[Job]]
    resume_eval: Callable[[ClusterRuntime, InterruptedJob], Awaitable[Job]]
    start_train: Callable[[ClusterRuntime, str], Awaitable[Job]]
    resume_train: Callable[[ClusterRuntime, InterruptedJob], Awaitable[Job]]
    diagnose: Callable[[ClusterRuntime, str], Awaitable[dict[str, Any]]]
    policy_passes: Callable[[ClusterRuntime, str], Awaitable[tuple[bool, list[str]]]]
    request_promotion: Callable[[ClusterRuntime, str], Awaitable[str]]
    cancel_job: Callable[[str], None]


class ClusterSupervisor:
    def __init__(self, runtime: ClusterRuntime, deps: LoopDeps) -> None:
        self.runtime = runtime
        self.deps = deps
        self.state = LoopState.IDLE
        self.paused_from: LoopState | None = None
        self.active = False
        self.reason = ""
        self.counters = RunCounters()
        self.current_job: str | None = None
        self._wake = anyio.Event()
        self._unpaused = anyio.Event()
        self._unpaused.set()
        self._stop_scope: anyio.CancelScope | None = None

    # -- state -------------------------------------------------------------------------
    def _transition(self, to: LoopState, reason: str) -> None:
        if to == self.state:
            return
        if to not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"{self.runtime.cluster.name}: {self.state} -> {to} is not a legal transition",
                                    data={"from": self.state.value, "to": to.value})
        ledger = self.runtime.require_ledger()
        if self.state == LoopState.PAUSED and to in _RUNNING and reason != "loop.resume":
            # The step that was running when the pause came has finished: remember where the
            # loop goes next, and stay paused.
            self.paused_from = to
            ledger.append("loop.transition", {"from": "paused", "to": "paused", "reason": f"next: {reason}",
                                              "active": self.active, "paused_from": to.value,
                                              "run": self.counters.as_dict()})
            return
        ledger.append("loop.transition", {"from": self.state.value, "to": to.value, "reason": reason,
                                          "active": self.active, "paused_from": self.paused_from.value
                                          if self.paused_from else None, "run": self.counters.as_dict()})
        log.info("loop transition", cluster=self.runtime.cluster.name, frm=self.state.value, to=to.value, reason=reason)
        self.state = to
        self.reason = reason
        if to in _RUNNING or to in (LoopState.PAUSED, LoopState.FAILED):
            self.runtime.phase = to.value
        else:
            self.runtime.phase = "idle"

    async def transition(self, to: LoopState, reason: str) -> None:
        await anyio.to_thread.run_sync(self._transition, to, reason)

    def restore(self) -> None:
        """Put the supervisor back in its recorded state (from the last loop.transition)."""
        ledger = self.runtime.ledger
        if ledger is None:
            return
        last = ledger.last_of("loop.transition")
        if last is None:
            return
        self.state = LoopState(last.data["to"])
        self.active = bool(last.data.get("active"))
        self.reason = str(last.data.get("reason", ""))
        self.counters = RunCounters.from_dict(last.data.get("run", {}))
        paused_from = last.data.get("paused_from")
        self.paused_from = LoopState(paused_from) if paused_from else None
        if self.state == LoopState.PAUSED:
            self._unpaused = anyio.Event()
        self.runtime.phase = self.state.value if self.state != LoopState.IDLE else self.runtime.phase

    # -- commands (from RPC) -------------------------------------------------------------
    async def start(self, reason: str = "loop.start") -> None:
        if self.state == LoopState.PAUSED:
            raise ConflictError(f"{self.runtime.cluster.name} is paused; resume it", data={"state": self.state.value})
        if self.active and self.state != LoopState.FAILED:
            raise ConflictError(f"the loop of {self.runtime.cluster.name} is already running",
                                data={"state": self.state.value})
        if self.runtime.pending_promotion:
            raise ConflictError(f"{self.runtime.cluster.name} awaits approval of {self.runtime.pending_promotion}",
                                data={"request_id": self.runtime.pending_promotion})
        self.active = True
        self.counters = RunCounters()
        await self.transition(LoopState.EVALUATING, reason)
        self._wake.set()

    async def trigger(self, reason: str) -> bool:
        """An event (a scenario drop) asks for an eval; ignored while a run is in progress."""
        if self.active or self.state in (LoopState.PAUSED, LoopState.AWAITING_APPROVAL):
            return False
        if self.state == LoopState.FAILED:
            await self.transition(LoopState.IDLE, "recovered by a new trigger")
        self.active = True
        self.counters = RunCounters()
        await self.transition(LoopState.EVALUATING, reason)
        self._wake.set()
        return True

    async def pause(self) -> None:
        if self.state == LoopState.PAUSED:
            raise ConflictError(f"{self.runtime.cluster.name} is already paused", data={"state": self.state.value})
        self.paused_from = self.state
        self._unpaused = anyio.Event()
        await self.transition(LoopState.PAUSED, "loop.pause")

    async def resume(self) -> None:
        if self.state != LoopState.PAUSED:
            raise ConflictError(f"{self.runtime.cluster.name} is not paused", data={"state": self.state.value})
        target = self.paused_from or LoopState.IDLE
        self.paused_from = None
        await self.transition(target, "loop.resume")
        self._unpaused.set()
        self._wake.set()

    async def stop(self) -> None:
        self.active = False
        if self.current_job:
            self.deps.cancel_job(self.current_job)
        if self._stop_scope is not None:
            self._stop_scope.cancel()
        self.paused_from = None
        self._unpaused.set()
        if self.state != LoopState.IDLE:
            await self.transition(LoopState.IDLE, "loop.stop")

    # -- the service -----------------------------------------------------------------------
    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await anyio.to_thread.run_sync(self.restore)
        interrupted = await anyio.to_thread.run_sync(interrupted_jobs, self.runtime.require_ledger())
        task_status.started()
        resumed = await self._resume_interrupted(interrupted)
        if self.active and self.state in _RUNNING:
            self._wake.set()
        if self.runtime.cluster.config.policy.autonomous and not self.active and self.state == LoopState.IDLE and not resumed:
            await self.start("autonomous at start")
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            if not self.active:
                continue
            with anyio.CancelScope() as scope:
                self._stop_scope = scope
                try:
                    await self._drive(resumed)
                except ModelsmithError as exc:
                    log.error("loop failed", cluster=self.runtime.cluster.name, error=exc.message)
                    self.active = False
                    await self.transition(LoopState.FAILED, f"{exc.name}: {exc.message}")
                except Exception as exc:
                    log.exception("loop crashed", cluster=self.runtime.cluster.name)
                    self.active = False
                    await self.transition(LoopState.FAILED, f"internal error: {type(exc).__name__}")
            self._stop_scope = None
            resumed = {}

    async def _resume_interrupted(self, interrupted: list[InterruptedJob]) -> dict[str, Job]:
        """Re-run interrupted jobs under their own ids. Returns them by kind."""
        jobs: dict[str, Job] = {}
        for item in interrupted:
            try:
                if item.kind == "eval":
                    jobs["eval"] = await self.deps.resume_eval(self.runtime, item)
                else:
                    work_dir = self.runtime.cluster.root / "train" / item.job_id
                    await anyio.to_thread.run_sync(stop_orphaned_trainer, work_dir)
                    jobs["train"] = await self.deps.resume_train(self.runtime, item)
                log.info("resumed an interrupted job", cluster=self.runtime.cluster.name, kind=item.kind,
                         job_id=item.job_id)
            except ModelsmithError as exc:
                log.error("could not resume a job", cluster=self.runtime.cluster.name, job_id=item.job_id,
                          error=exc.message)
                kind = "eval.failed" if item.kind == "eval" else "train.failed"
                entry = {"job_id": item.job_id, "error": f"not resumable after restart: {exc.message}"}
                await anyio.to_thread.run_sync(self.runtime.require_ledger().append, kind, entry)
        return jobs

    async def _wait(self, job: Job) -> Job:
        self.current_job = job.job_id
        started = time.monotonic()
        try:
            await job.wait_finished()
        finally:
            self.current_job = None
            self.counters.device_seconds_today += time.monotonic() - started
        if job.state != JobState.SUCCEEDED:
            message = (job.error or {}).get("message", job.state.value)
            raise ModelsmithError(f"{job.kind} job {job.job_id} {job.state.value}: {message}",
                                  data={"job_id": job.job_id})
        return job

    async def _checkpoint(self) -> None:
        """Between steps: honour pause, stop and the day's budget."""
        await self._unpaused.wait()
        policy = self.runtime.cluster.config.policy
        today = datetime.now(UTC).date().isoformat()
        if self.counters.day != today:
            self.counters.day, self.counters.device_seconds_today = today, 0.0
        if policy.device_seconds_per_day and self.counters.device_seconds_today >= policy.device_seconds_per_day:
            raise _Done("device budget for today is spent")

    async def _drive(self, resumed: dict[str, Job]) -> None:
        policy = self.runtime.cluster.config.policy
        try:
            while self.active:
                await self._checkpoint()
                if self.state == LoopState.EVALUATING:
                    job = resumed.pop("eval") if "eval" in resumed else await self.deps.start_eval(self.runtime, None)
                    await self._wait(job)
                    tag = str((job.result or {}).get("tag"))
                    await self._after_eval(tag)
                elif self.state == LoopState.DIAGNOSING:
                    diag_tag = self.counters.last_eval_tag or self.runtime.last_eval_tag
                    assert diag_tag is not None
                    diagnosis = await self.deps.diagnose(self.runtime, diag_tag)
                    top = [p["pattern"] for p in diagnosis.get("patterns", [])[:3]]
                    await self.transition(LoopState.TRAINING, f"{diagnosis.get('failed', 0)} failures; top: {', '.join(top)}")
                elif self.state == LoopState.TRAINING:
                    started = time.monotonic()
                    train_tag = self.counters.last_eval_tag or self.runtime.last_eval_tag
                    assert train_tag is not None
                    job = resumed.pop("train") if "train" in resumed else await self.deps.start_train(self.runtime, train_tag)
                    await self._wait(job)
                    self.counters.iterations += 1
                    spent = time.monotonic() - started
                    if policy.device_seconds_per_iteration and spent > policy.device_seconds_per_iteration:
                        raise _Done(f"iteration used {spent:.0f} s of device time, over the budget")
                    await self.transition(LoopState.EVALUATING, f"iteration {self.runtime.iteration} trained")
                elif self.state == LoopState.AWAITING_APPROVAL:
                    # The decision is applied by the promotion service in a worker thread; a short
                    # poll of the runtime avoids a cross-thread event for a wait of hours.
                    while self.runtime.pending_promotion:  # noqa: ASYNC110
                        await anyio.sleep(APPROVAL_POLL_S)
                    if self.runtime.candidate is None:  # approved: the candidate became champion
                        self.active = False
                        await self.transition(LoopState.IDLE, "promotion approved")
                    else:
                        await self.transition(LoopState.DIAGNOSING, "promotion rejected; back to the loop")
                else:
                    return
        except _Done as done:
            self.active = False
            await self.transition(LoopState.IDLE, done.reason)

    async def _after_eval(self, tag: str) -> None:
        policy = self.runtime.cluster.config.policy
        self.counters.last_eval_tag = tag
        summary = self.runtime.last_summary or {}
        composite = summary.get("composite")
        if self.runtime.candidate is not None:
            passed, reasons = await self.deps.policy_passes(self.runtime, tag)
        else:
            passed, reasons = False, ["no candidate adapter yet"]
        if passed and policy.stop_when_gate_passes:
            try:
                request_id = await self.deps.request_promotion(self.runtime, tag)
            except GateFailed as exc:
                raise _Done(f"gate passed but the request was refused: {exc.message}") from exc
            await self.transition(LoopState.AWAITING_APPROVAL, f"gate passed; promotion {request_id} requested")
            return
        if composite is not None:
            best = self.counters.best_composite
            if best is None or composite > best + 1e-9:
                self.counters.best_composite = composite
                self.counters.without_improvement = 0
            else:
                self.counters.without_improvement += 1
        if self.counters.iterations >= policy.max_iterations:
            raise _Done(f"stopped after {self.counters.iterations} iteration(s) (max_iterations)")
        if self.counters.without_improvement >= policy.patience_iterations:
            raise _Done(f"no improvement in {self.counters.without_improvement} iteration(s)")
        await self.transition(LoopState.DIAGNOSING, f"eval {tag}: gate not passed ({'; '.join(reasons[:3])})")

    def status(self) -> dict[str, Any]:
        return {"cluster": self.runtime.cluster.name, "state": self.state.value, "active": self.active,
                "reason": self.reason, "paused_from": self.paused_from.value if self.paused_from else None,
                "current_job": self.current_job, "run": self.counters.as_dict(), "pid": os.getpid()}


class _Done(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
