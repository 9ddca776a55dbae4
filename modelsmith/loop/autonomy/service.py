"""loop.* methods and the wiring of one supervisor per cluster to the eval/train/promotion services."""

from __future__ import annotations

import os
from typing import Any, Literal

import anyio
import anyio.abc
import msgspec

from modelsmith.loop.autonomy.supervisor import ClusterSupervisor, LoopDeps
from modelsmith.loop.cluster.fleet import ClusterRuntime, Fleet
from modelsmith.loop.cluster.recovery import InterruptedJob
from modelsmith.loop.eval.diagnose import diagnose_eval
from modelsmith.loop.eval.service import EvalService
from modelsmith.loop.jobs.registry import Job, JobRegistry
from modelsmith.loop.records.events import EvalStarted, TrainStarted
from modelsmith.loop.train.service import TrainService
from modelsmith.rpc.dispatch import MethodTable
from modelsmith.rpc.schema.evals import EvalRunParams
from modelsmith.rpc.schema.loop import LoopControlParams, LoopStatus, LoopStatuses, LoopStatusParams
from modelsmith.rpc.schema.train import Diagnosis, TrainStartParams
from modelsmith.rpc.server import CallContext


class LoopService:
    def __init__(self, fleet: Fleet, jobs: JobRegistry, evals: EvalService, training: TrainService,
                 promotions: Any, synth: Any = None) -> None:
        self.fleet = fleet
        self.synth = synth  # SynthService: [synthesis] per_iteration
        self.jobs = jobs
        self.evals = evals
        self.training = training
        self.promotions = promotions
        self.supervisors: dict[str, ClusterSupervisor] = {}
        self._deps = LoopDeps(
            start_eval=self._start_eval, resume_eval=self._resume_eval, start_train=self._start_train,
            resume_train=self._resume_train, diagnose=self._diagnose, policy_passes=self._policy_passes,
            request_promotion=self._request_promotion, cancel_job=self._cancel_job,
            synthesise=self._synthesise,
        )

    # -- the deps the supervisors use -----------------------------------------------------
    async def _start_eval(self, runtime: ClusterRuntime, tag: str | None) -> Job:
        params = EvalRunParams(cluster=runtime.cluster.name, type="full", tag=tag)
        plan = await anyio.to_thread.run_sync(self.evals.plan, runtime, params)
        return self.evals.start(params, plan=plan)[0]

    async def _resume_eval(self, runtime: ClusterRuntime, item: InterruptedJob) -> Job:
        started = item.started
        assert isinstance(started, EvalStarted)
        params = EvalRunParams(cluster=runtime.cluster.name, tag=started.tag,
                               type=started.type,  # type: ignore[arg-type]
                               quick=started.quick, domain=started.domain,
                               adapter=None if started.engine else started.adapter or "base",
                               engine=started.engine)
        plan = await anyio.to_thread.run_sync(lambda: self.evals.plan(runtime, params, resume=True))
        return self.evals.start(params, plan=plan, resume_job_id=item.job_id)[0]

    async def _start_train(self, runtime: ClusterRuntime, eval_tag: str) -> Job:
        from modelsmith.loop.jobs.registry import new_job_id

        params = TrainStartParams(cluster=runtime.cluster.name, eval_tag=eval_tag, follow_up_eval=False,
                                  target=_target(runtime))
        job_id = new_job_id()
        prepared = await anyio.to_thread.run_sync(self.training.prepare, params, job_id)
        return self.training.start(params, job_id, prepared)[0]

    async def _resume_train(self, runtime: ClusterRuntime, item: InterruptedJob) -> Job:
        started = item.started
        assert isinstance(started, TrainStarted)
        params = TrainStartParams(cluster=runtime.cluster.name, eval_tag=started.eval_tag,
                                  follow_up_eval=False, target=_target(runtime))
        prepared = await anyio.to_thread.run_sync(
            lambda: self.training.prepare(params, item.job_id, resume=True))
        return self.training.start(params, item.job_id, prepared)[0]

    async def _synthesise(self, runtime: ClusterRuntime, tag: str) -> Job | None:
        """A synth job of ``per_iteration`` scenarios per pattern with the cluster's generator;
        None when synthesis is off, or there is nothing to synthesise from."""
        synthesis = runtime.cluster.config.synthesis
        if self.synth is None or synthesis.per_iteration == 0 or synthesis.generator is None:
            return None
        from modelsmith.errors import ValidationError
        from modelsmith.rpc.schema.synth import SynthRunParams

        params = SynthRunParams(cluster=runtime.cluster.name, from_eval=tag,
                                count=synthesis.per_iteration)
        try:
            plan = await anyio.to_thread.run_sync(self.synth.plan, runtime, params)
        except ValidationError:  # no failures left, a generator that does not load
            return None
        job: Job = self.synth.start(runtime, plan)
        return job

    async def _diagnose(self, runtime: ClusterRuntime, tag: str) -> Diagnosis:
        return await anyio.to_thread.run_sync(diagnose_eval, runtime, tag)

    async def _policy_passes(self, runtime: ClusterRuntime, tag: str) -> tuple[bool, list[str]]:
        report = await self.promotions.policy_check(runtime.cluster.name, tag)
        reasons = [f"{c.check}: {c.detail}" for c in report.checks if not c.passed]
        return bool(report.passed), reasons

    async def _request_promotion(self, runtime: ClusterRuntime, tag: str) -> str:
        from modelsmith.loop.promotion.service import Requester

        requested = await self.promotions.request(
            runtime.cluster.name, Requester.of(os.getuid(), os.getpid()), eval_tag=tag,
            note="requested by the autonomous loop")
        return str(requested.request_id)

    def _cancel_job(self, job_id: str) -> None:
        job = self.jobs.get(job_id)
        if not job.state.finished:
            self.jobs.cancel(job_id)

    # -- service ------------------------------------------------------------------------
    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            for name, runtime in self.fleet.runtimes.items():
                if runtime.ledger is None:
                    continue  # an unavailable cluster has no supervisor; its STATUS says why
                supervisor = ClusterSupervisor(runtime, self._deps)
                self.supervisors[name] = supervisor
                await tg.start(supervisor.run)
            task_status.started()

    async def trigger(self, runtime: ClusterRuntime, reason: str) -> bool:
        """Ask a cluster's supervisor for a run (file drops); False when it is busy or absent."""
        supervisor = self.supervisors.get(runtime.cluster.name)
        return await supervisor.trigger(reason) if supervisor is not None else False

    def get(self, cluster: str) -> ClusterSupervisor:
        runtime = self.fleet.get(cluster)
        supervisor = self.supervisors.get(cluster)
        if supervisor is None:
            from modelsmith.errors import Unavailable

            raise Unavailable(f"cluster {cluster} has no supervisor: {runtime.status_error}",
                              data={"cluster": cluster})
        return supervisor

    def register(self, table: MethodTable) -> None:
        def status_of(s: ClusterSupervisor) -> LoopStatus:
            return msgspec.convert(s.status(), LoopStatus)

        async def loop_start(params: LoopControlParams, ctx: CallContext) -> LoopStatus:
            s = self.get(params.cluster)
            await s.start(f"loop.start by uid {ctx.peer.uid}")
            return status_of(s)

        async def loop_pause(params: LoopControlParams, ctx: CallContext) -> LoopStatus:
            s = self.get(params.cluster)
            await s.pause()
            return status_of(s)

        async def loop_resume(params: LoopControlParams, ctx: CallContext) -> LoopStatus:
            s = self.get(params.cluster)
            await s.resume()
            return status_of(s)

        async def loop_stop(params: LoopControlParams, ctx: CallContext) -> LoopStatus:
            s = self.get(params.cluster)
            await s.stop()
            return status_of(s)

        async def loop_status(params: LoopStatusParams, ctx: CallContext) -> LoopStatuses:
            chosen = [self.get(params.cluster)] if params.cluster else list(self.supervisors.values())
            return LoopStatuses(loops=[status_of(s) for s in chosen])

        table.add("loop.start", LoopControlParams, loop_start, "Run the loop of a cluster by itself.")
        table.add("loop.pause", LoopControlParams, loop_pause, "Pause the loop after the current step.")
        table.add("loop.resume", LoopControlParams, loop_resume, "Resume a paused loop where it was.")
        table.add("loop.stop", LoopControlParams, loop_stop, "Stop the loop and cancel its running job.")
        table.add("loop.status", LoopStatusParams, loop_status, "Supervisor state of one or every cluster.", inline=True)


def _target(runtime: ClusterRuntime) -> Literal["failures", "failures+synthetic"]:
    """With ``[synthesis] per_iteration`` the loop trains on the synthetic scenarios too."""
    synthesis = runtime.cluster.config.synthesis
    return "failures+synthetic" if synthesis.per_iteration and synthesis.generator else "failures"
