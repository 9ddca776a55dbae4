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

import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import anyio.abc
import msgspec
import structlog

from modelsmith.clock import utc_now
from modelsmith.errors import ConflictError, GateFailed, ModelsmithError
from modelsmith.loop.cluster.fleet import ClusterRuntime
from modelsmith.loop.cluster.recovery import InterruptedJob, interrupted_jobs, stop_orphaned_trainer
from modelsmith.loop.cluster.state import LoopRecord, LoopState
from modelsmith.loop.jobs.registry import Job, JobState
from modelsmith.loop.records.events import (
    EvalFailed,
    LoopTransition,
    RunCounters,
    TrainFailed,
    failure_of,
)
from modelsmith.rpc.schema.train import Diagnosis

log = structlog.get_logger("modelsmith.supervisor")

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


def new_run() -> RunCounters:
    """The counters of a run that starts now."""
    return RunCounters(day=utc_now().date().isoformat())


def plan_transition(loop: LoopRecord, to: LoopState, reason: str, *, active: bool,
                    run: RunCounters, paused_from: LoopState | None) -> LoopTransition | None:
    """The ledger event that moves ``loop`` to ``to`` (pure), or None when nothing changes.

    Raises IllegalTransition for a move the state machine does not allow. While paused, a step
    that finishes (any move to a running state other than by ``loop.resume``) is remembered as
    where the loop goes next, and the loop stays paused.
    """
    frm = loop.state
    if to == frm and active == loop.active and paused_from == loop.paused_from:
        return None
    if to != frm and to not in TRANSITIONS[frm]:
        raise IllegalTransition(f"{frm} -> {to} is not a legal transition",
                                data={"from": frm.value, "to": to.value})
    if frm == LoopState.PAUSED and to in _RUNNING and reason != "loop.resume":
        return LoopTransition(from_="paused", to="paused", reason=f"next: {reason}", active=active,
                              paused_from=to.value, run=run)
    return LoopTransition(from_=frm.value, to=to.value, reason=reason, active=active,
                          paused_from=paused_from.value if paused_from else None, run=run)


@dataclass
class LoopDeps:
    """The services a supervisor drives (injected by the daemon)."""

    start_eval: Callable[[ClusterRuntime, str | None], Awaitable[Job]]
    resume_eval: Callable[[ClusterRuntime, InterruptedJob], Awaitable[Job]]
    start_train: Callable[[ClusterRuntime, str], Awaitable[Job]]
    resume_train: Callable[[ClusterRuntime, InterruptedJob], Awaitable[Job]]
    diagnose: Callable[[ClusterRuntime, str], Awaitable[Diagnosis]]
    policy_passes: Callable[[ClusterRuntime, str], Awaitable[tuple[bool, list[str]]]]
    request_promotion: Callable[[ClusterRuntime, str], Awaitable[str]]
    cancel_job: Callable[[str], None]
    # ``[synthesis] per_iteration``: a synth job before each training (None: nothing to do).
    synthesise: Callable[[ClusterRuntime, str], Awaitable[Job | None]] | None = None


class ClusterSupervisor:
    """Runs one cluster's loop. Its state, activity, reason and counters are the ledger's
    (``runtime.state.loop``); it keeps only what a restart need not know (the running job's id,
    the counters of the step in progress, its wake-up events)."""

    def __init__(self, runtime: ClusterRuntime, deps: LoopDeps) -> None:
        self.runtime = runtime
        self.deps = deps
        self.current_job: str | None = None
        self._run = new_run()  # this step's counters; recorded with the next transition
        self._wake = anyio.Event()
        self._unpaused = anyio.Event()
        self._unpaused.set()
        self._stop_scope: anyio.CancelScope | None = None

    # -- state (derived from the ledger) ---------------------------------------------------
    @property
    def _loop(self) -> LoopRecord:
        return self.runtime.state.loop

    @property
    def state(self) -> LoopState:
        return self._loop.state

    @property
    def active(self) -> bool:
        return self._loop.active

    @property
    def paused_from(self) -> LoopState | None:
        return self._loop.paused_from

    def _transition(self, to: LoopState, reason: str, *, active: bool | None = None,
                    paused_from: LoopState | Literal["keep"] | None = "keep") -> None:
        loop = self._loop
        event = plan_transition(
            loop, to, reason, active=loop.active if active is None else active, run=self._run,
            paused_from=loop.paused_from if paused_from == "keep" else paused_from)
        if event is None:
            return
        try:
            self.runtime.record(event)
        except IllegalTransition:
            raise
        log.info("loop transition", cluster=self.runtime.cluster.name, frm=event.from_, to=event.to,
                 reason=event.reason)

    async def transition(self, to: LoopState, reason: str, *, active: bool | None = None,
                         paused_from: LoopState | Literal["keep"] | None = "keep") -> None:
        try:
            await anyio.to_thread.run_sync(
                lambda: self._transition(to, reason, active=active, paused_from=paused_from))
        except IllegalTransition as exc:
            raise IllegalTransition(f"{self.runtime.cluster.name}: {exc.message}", data=exc.data) from None

    def restore(self) -> None:
        """Take the counters of the recorded run (the state itself is the ledger's)."""
        self._run = self._loop.run if self._loop.run.day else new_run()
        if self.state == LoopState.PAUSED:
            self._unpaused = anyio.Event()

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
        self._run = new_run()
        await self.transition(LoopState.EVALUATING, reason, active=True)
        self._wake.set()

    async def trigger(self, reason: str) -> bool:
        """An event (a scenario drop) asks for an eval; ignored while a run is in progress."""
        if self.active or self.state in (LoopState.PAUSED, LoopState.AWAITING_APPROVAL):
            return False
        if self.state == LoopState.FAILED:
            await self.transition(LoopState.IDLE, "recovered by a new trigger")
        self._run = new_run()
        await self.transition(LoopState.EVALUATING, reason, active=True)
        self._wake.set()
        return True

    async def pause(self) -> None:
        if self.state == LoopState.PAUSED:
            raise ConflictError(f"{self.runtime.cluster.name} is already paused", data={"state": self.state.value})
        self._unpaused = anyio.Event()
        await self.transition(LoopState.PAUSED, "loop.pause", paused_from=self.state)

    async def resume(self) -> None:
        if self.state != LoopState.PAUSED:
            raise ConflictError(f"{self.runtime.cluster.name} is not paused", data={"state": self.state.value})
        target = self.paused_from or LoopState.IDLE
        await self.transition(target, "loop.resume", paused_from=None)
        self._unpaused.set()
        self._wake.set()

    async def stop(self) -> None:
        if self.current_job:
            self.deps.cancel_job(self.current_job)
        if self._stop_scope is not None:
            self._stop_scope.cancel()
        self._unpaused.set()
        await self.transition(LoopState.IDLE, "loop.stop", active=False, paused_from=None)

    # -- the service -----------------------------------------------------------------------
    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self.restore()
        interrupted = interrupted_jobs(self.runtime.state)
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
                    await self.transition(LoopState.FAILED, f"{exc.name}: {exc.message}", active=False)
                except Exception as exc:
                    log.exception("loop crashed", cluster=self.runtime.cluster.name)
                    await self.transition(LoopState.FAILED, f"internal error: {type(exc).__name__}",
                                          active=False)
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
                error = failure_of(type(exc)(f"not resumable after restart: {exc.message}", data=exc.data))
                event: EvalFailed | TrainFailed = (
                    EvalFailed(job_id=item.job_id, error=error, tag=getattr(item.started, "tag", None))
                    if item.kind == "eval" else TrainFailed(job_id=item.job_id, error=error))
                await anyio.to_thread.run_sync(self.runtime.record, event)
        return jobs

    async def _wait(self, job: Job) -> Job:
        self.current_job = job.job_id
        started = time.monotonic()
        try:
            await job.wait_finished()
        finally:
            self.current_job = None
            self._run = msgspec.structs.replace(
                self._run, device_seconds_today=round(
                    self._run.device_seconds_today + time.monotonic() - started, 3))
        if job.state != JobState.SUCCEEDED:
            message = (job.error or {}).get("message", job.state.value)
            raise ModelsmithError(f"{job.kind} job {job.job_id} {job.state.value}: {message}",
                                  data={"job_id": job.job_id})
        return job

    async def _checkpoint(self) -> None:
        """Between steps: honour pause, stop and the day's budget."""
        await self._unpaused.wait()
        policy = self.runtime.cluster.config.policy
        today = utc_now().date().isoformat()
        if self._run.day != today:
            self._run = msgspec.structs.replace(self._run, day=today, device_seconds_today=0.0)
        if policy.device_seconds_per_day and self._run.device_seconds_today >= policy.device_seconds_per_day:
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
                    diag_tag = self._run.last_eval_tag or self.runtime.last_eval_tag
                    assert diag_tag is not None
                    diagnosis = await self.deps.diagnose(self.runtime, diag_tag)
                    top = [p.pattern for p in diagnosis.patterns[:3]]
                    await self.transition(LoopState.TRAINING, f"{diagnosis.failed} failures; top: {', '.join(top)}")
                elif self.state == LoopState.TRAINING:
                    started = time.monotonic()
                    train_tag = self._run.last_eval_tag or self.runtime.last_eval_tag
                    assert train_tag is not None
                    if "train" not in resumed:
                        await self._synthesise(train_tag)
                    job = resumed.pop("train") if "train" in resumed else await self.deps.start_train(self.runtime, train_tag)
                    await self._wait(job)
                    self._run = msgspec.structs.replace(self._run, iterations=self._run.iterations + 1)
                    spent = time.monotonic() - started
                    if policy.device_seconds_per_iteration and spent > policy.device_seconds_per_iteration:
                        raise _Done(f"iteration used {spent:.0f} s of device time, over the budget")
                    await self.transition(LoopState.EVALUATING, f"iteration {self.runtime.iteration} trained")
                elif self.state == LoopState.AWAITING_APPROVAL:
                    # Woken by the ledger append that records the decision (whatever thread it).
                    await self.runtime.wait_state(lambda state: state.pending_promotion is None)
                    if self.runtime.candidate is None:  # approved: the candidate became champion
                        await self.transition(LoopState.IDLE, "promotion approved", active=False)
                    else:
                        await self.transition(LoopState.DIAGNOSING, "promotion rejected; back to the loop")
                else:
                    return
        except _Done as done:
            await self.transition(LoopState.IDLE, done.reason, active=False)

    async def _synthesise(self, tag: str) -> None:
        """``[synthesis] per_iteration``: synthesise before training; its time is device time of
        this iteration and day (``_wait``). A failed synth job is recorded (synth.failed) and
        the iteration trains on what there is."""
        if self.deps.synthesise is None:
            return
        job = await self.deps.synthesise(self.runtime, tag)
        if job is None:
            return
        try:
            await self._wait(job)
        except ModelsmithError:
            return

    async def _after_eval(self, tag: str) -> None:
        policy = self.runtime.cluster.config.policy
        self._run = msgspec.structs.replace(self._run, last_eval_tag=tag)
        summary = self.runtime.last_summary
        composite = summary.composite if summary is not None else None
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
        run = self._run
        if composite is not None:
            best = run.best_composite
            if best is None or composite > best + 1e-9:
                run = msgspec.structs.replace(run, best_composite=composite, without_improvement=0)
            else:
                run = msgspec.structs.replace(run, without_improvement=run.without_improvement + 1)
            self._run = run
        if run.iterations >= policy.max_iterations:
            raise _Done(f"stopped after {run.iterations} iteration(s) (max_iterations)")
        if run.without_improvement >= policy.patience_iterations:
            raise _Done(f"no improvement in {run.without_improvement} iteration(s)")
        await self.transition(LoopState.DIAGNOSING, f"eval {tag}: gate not passed ({'; '.join(reasons[:3])})")

    def status(self) -> dict[str, Any]:
        loop = self._loop
        return {"cluster": self.runtime.cluster.name, "state": loop.state.value, "active": loop.active,
                "reason": loop.reason, "paused_from": loop.paused_from.value if loop.paused_from else None,
                "current_job": self.current_job, "run": msgspec.to_builtins(loop.run), "pid": os.getpid()}


class _Done(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
