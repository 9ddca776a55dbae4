"""The train service: diagnose.run and train.*: GRPO on an eval's failures, hot-loaded after.

A training job: pick the core failures of an eval (never held-out: the manifest proves it),
take a device lease (``[training] device``; the engines on a shared GPU sleep), run the trainer
child, wake the engines as soon as it ends (however it ends), and when it ends with an adapter:
write the training manifest, advance the iteration in the ledger with the adapter hash, load
the adapter into the warm engine (no restart) while the device is still held, and start an eval
of the same set against it so ``eval.compare`` shows what the iteration fixed and broke.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec
import structlog

from modelsmith.atomic import atomic_write_bytes
from modelsmith.clock import utc_stamp
from modelsmith.errors import ConflictError, ModelsmithError, NotFound, TrainerError, Unavailable
from modelsmith.gpu.engines import EnginePool
from modelsmith.gpu.leases import LeaseManager
from modelsmith.gpu.ray_backend import describe_placements
from modelsmith.gpu.trainer_process import TrainerOutcome, retrying, run_trainer
from modelsmith.gpu.trainer_spec import (
    AdapterSaved,
    ConvergenceSpec,
    GrpoSpec,
    LoraSpec,
    RolloutSpec,
    TrainerCheckpoint,
    TrainerEvent,
    TrainerMetric,
    TrainerStarted,
    TrainerStopped,
    TrainJobSpec,
    estimate_duration_minutes,
)
from modelsmith.gpu.warm_trainer import WarmTrainer
from modelsmith.hashing import sha256_hex
from modelsmith.loop.cluster.fleet import ClusterRuntime, Fleet
from modelsmith.loop.eval.diagnose import diagnose_eval
from modelsmith.loop.eval.run import RESULTS_FILE, eval_dir, read_results, read_summary
from modelsmith.loop.eval.service import EvalService
from modelsmith.loop.jobs.registry import Job, JobRegistry
from modelsmith.loop.records.events import IterationAdvanced, TrainFailed, failure_of
from modelsmith.loop.records.events import TrainStarted as TrainStartedEvent
from modelsmith.loop.scoring.scenarios import Scenario, ScenarioCatalog
from modelsmith.loop.train.hot_load import load_verified
from modelsmith.loop.train.reward_judges import reward_judges
from modelsmith.loop.train.training_set import (
    build_manifest,
    select_synthetic,
    select_training_scenarios,
)
from modelsmith.rpc.dispatch import MethodTable
from modelsmith.rpc.schema.evals import EvalRunParams
from modelsmith.rpc.schema.jobs import JobSummary
from modelsmith.rpc.schema.train import (
    DiagnoseParams,
    Diagnosis,
    TrainCancelParams,
    TrainJobRef,
    TrainStarted,
    TrainStartParams,
    TrainStatus,
)
from modelsmith.rpc.server import CallContext

log = structlog.get_logger("modelsmith.train")

TRAINING_MANIFEST = "training_manifest.json"
_encoder = msgspec.json.Encoder()


class TrainService:
    def __init__(self, fleet: Fleet, jobs: JobRegistry, engines: EnginePool, evals: EvalService, leases: LeaseManager) -> None:
        self.fleet = fleet
        self.jobs = jobs
        self.engines = engines
        self.evals = evals
        self.leases = leases
        self.warm_trainer = WarmTrainer()  # the next job's trainer, imports done
        # [ray] address set: the daemon puts a modelsmith.gpu.ray_trainer.RayTrainerRunner here
        # and training jobs run on the Ray cluster instead of under a local device lease.
        self.ray_trainer: Any = None

    # -- building the job ---------------------------------------------------------------
    def spec_for(self, runtime: ClusterRuntime, params: TrainStartParams, job_id: str, iteration: int,
                 scenarios: list[dict[str, Any]], init_adapter: str | None, resume: bool = False) -> TrainJobSpec:
        t = runtime.cluster.config.training
        o = params.overrides
        def pick(name: str) -> Any:
            value = getattr(o, name, None) if o is not None else None
            return getattr(t, name) if value is None else value

        return TrainJobSpec(
            job_id=job_id,
            cluster=runtime.cluster.name,
            base_model=str(runtime.cluster.base_model),
            output_dir=str(runtime.adapter_path(f"iter-{iteration}")),
            work_dir=str(runtime.cluster.root / "train" / job_id),
            scenarios=scenarios,
            init_adapter=str(runtime.adapter_path(init_adapter)) if init_adapter else None,
            lora=LoraSpec(r=t.lora.r, alpha=t.lora.alpha, dropout=t.lora.dropout,
                          target_modules=tuple(t.lora.target_modules)),
            grpo=GrpoSpec(
                max_steps=pick("max_steps"), learning_rate=pick("learning_rate"),
                num_generations=pick("num_generations"),
                per_device_train_batch_size=pick("per_device_train_batch_size"),
                gradient_accumulation_steps=t.gradient_accumulation_steps,
                max_prompt_length=t.max_prompt_length, max_completion_length=pick("max_completion_length"),
                beta=pick("beta"), temperature=pick("temperature"), seed=pick("seed"),
                save_steps=pick("save_steps"),
            ),
            convergence=ConvergenceSpec(plateau_window=t.plateau_window, plateau_min_delta=t.plateau_min_delta,
                                        plateau_patience=t.plateau_patience, min_steps=t.min_steps),
            rollout=RolloutSpec(backend=t.rollout, sync_steps=t.rollout_sync_steps,
                                max_resample_rounds=t.rollout_max_resample_rounds,
                                gpu_memory_utilization=t.rollout_gpu_memory_utilization),
            resume=resume,
            chat_template_kwargs=dict(runtime.cluster.config.model.chat_template_kwargs),
            num_workers=t.num_workers,
        )

    def prepare(self, params: TrainStartParams, job_id: str, *, resume: bool = False
                ) -> tuple[ClusterRuntime, TrainJobSpec, dict[str, Any]]:
        """Validate and build everything before the job is accepted (runs in a worker thread).

        ``resume`` rebuilds an interrupted job under its own id: the trainer continues from the
        last checkpoint in its work dir.
        """
        runtime = self.fleet.get(params.cluster)
        runtime.require_ledger()
        if runtime.pending_promotion:
            raise ConflictError(
                f"cluster {runtime.cluster.name} is awaiting approval of {runtime.pending_promotion}; "
                "nothing is trained until it is decided", data={"request_id": runtime.pending_promotion})
        busy = [j for j in self.jobs.list_jobs(cluster=runtime.cluster.name) if j.kind == "train" and not j.state.finished]
        if busy:
            raise ConflictError(f"cluster {runtime.cluster.name} is already training (job {busy[0].job_id})",
                                data={"job_id": busy[0].job_id})
        catalog = runtime.require_catalog()
        read_summary(runtime, params.eval_tag)  # the eval must have finished
        results = read_results(eval_dir(runtime, params.eval_tag) / RESULTS_FILE)
        t = runtime.cluster.config.training
        margin = (params.overrides.near_miss_margin if params.overrides and params.overrides.near_miss_margin is not None
                  else t.near_miss_margin)
        if params.target in ("failures", "failures+synthetic"):
            margin = 0.0
        chosen = select_training_scenarios(catalog, results, near_miss_margin=margin)
        threshold = None
        if params.target == "failures+synthetic":
            # The synthetic scenarios made for this eval's failure patterns, checked again for
            # near-duplicates of held-out prompts in the manifest's proof.
            chosen = sorted([*chosen, *synthetic_for_eval(runtime, catalog, params.eval_tag)],
                            key=lambda s: s.id)
            threshold = runtime.cluster.config.synthesis.near_duplicate_threshold
        iteration = runtime.iteration + 1
        init_adapter = {
            "latest": runtime.candidate or runtime.champion,
            "candidate": runtime.candidate,
            "champion": runtime.champion,
            "base": None,
        }[params.init]
        if params.init in ("candidate", "champion") and init_adapter is None:
            raise NotFound(f"cluster {runtime.cluster.name} has no {params.init} adapter to start from",
                           data={"field": "init"})
        manifest = build_manifest(
            scenarios=chosen, catalog=catalog, job_id=job_id, cluster=runtime.cluster.name,
            iteration=iteration, eval_tag=params.eval_tag, base_model=str(runtime.cluster.base_model),
            init_adapter=init_adapter, near_miss_margin=margin, near_duplicate_threshold=threshold,
            metrics_log=f"logs/train-{job_id}.log", created_at=utc_stamp(),
        )
        spec = self.spec_for(runtime, params, job_id, iteration,
                             [msgspec.to_builtins(s) for s in chosen], init_adapter, resume)
        # The reward asks the eval's judges, or nothing trains (JudgeUnreachable names why).
        spec = msgspec.structs.replace(
            spec, judges=reward_judges(chosen, runtime.cluster, self.evals.named))
        if spec.num_workers > 1 and self.ray_trainer is None:
            raise Unavailable(
                f"training.num_workers = {spec.num_workers} needs the Ray backend ([ray] address "
                "in modelsmith.toml: the job then runs as Ray Train's TorchTrainer); this daemon "
                "trains on one device", data={"field": "training.num_workers",
                                              "file": str(runtime.cluster.root / "cluster.toml")})
        problems = spec.problems()
        if problems:
            from modelsmith.errors import ValidationError

            field, why = problems[0]
            raise ValidationError(f"training config: {field} {why}", data={"field": field})
        return runtime, spec, msgspec.to_builtins(manifest)

    def start(self, params: TrainStartParams, job_id: str,
              prepared: tuple[ClusterRuntime, TrainJobSpec, dict[str, Any]]) -> tuple[Job, TrainJobSpec]:
        """Submit a prepared job (on the event loop; :meth:`prepare` runs in a thread)."""
        runtime, spec, manifest = prepared
        log_path = runtime.cluster.logs_dir() / f"train-{job_id}.log"

        async def run(job: Job) -> dict[str, Any]:
            return await self._run(job, runtime, spec, manifest, params, log_path)

        job = self.jobs.submit("train", runtime.cluster.name, run, job_id=job_id, log_path=str(log_path))
        job.progress_total = spec.grpo.max_steps
        return job, spec

    async def _run(self, job: Job, runtime: ClusterRuntime, spec: TrainJobSpec, manifest: dict[str, Any],
                   params: TrainStartParams, log_path: Path) -> dict[str, Any]:
        runtime.require_ledger()
        iteration = int(manifest["iteration"])
        out = Path(spec.output_dir)
        if await anyio.Path(out).exists():
            # Left by a crash after the trainer saved but before the ledger advanced: not an
            # iteration of record. Keep it aside for inspection, never reuse it.
            aside = out.with_name(f".orphan-{out.name}-{int(time.time())}")
            await anyio.to_thread.run_sync(out.rename, aside)
        await anyio.to_thread.run_sync(runtime.record, TrainStartedEvent(
            job_id=job.job_id, iteration=iteration, eval_tag=params.eval_tag,
            scenarios=len(spec.scenarios), work_dir=spec.work_dir, init_adapter=spec.init_adapter))
        state: dict[str, Any] = {"metrics": 0, "stopped": None, "total": spec.grpo.max_steps}

        def on_event(event: TrainerEvent) -> None:
            if isinstance(event, TrainerMetric):
                job.emit("metric", msgspec.to_builtins(event))
                job.set_progress(event.step, state["total"], f"step {event.step}: reward {event.reward_mean}")
            elif isinstance(event, TrainerStarted):
                state["total"] = event.total_steps
                job.emit("log", msgspec.to_builtins(event))
            elif isinstance(event, TrainerStopped):
                state["stopped"] = event
                job.emit("log", msgspec.to_builtins(event))
            elif isinstance(event, TrainerCheckpoint | AdapterSaved):
                job.emit("log", msgspec.to_builtins(event))

        def on_position(position: int | None) -> None:
            job.set_queue_position(position)
            if position:
                job.message = f"queued for the device (position {position})"

        trained_at: float
        # The lease outlives the try below: the engines that slept for the trainer wake as soon
        # as it ends (however it ends), and the device stays ours until the adapter is loaded,
        # so a queued trainer cannot put the engine back to sleep before the hot load.
        async with contextlib.AsyncExitStack() as device_held:
            try:
                retries = runtime.cluster.config.training.retries

                def on_retry(attempt: int, exc: TrainerError) -> None:
                    job.emit("log", {"event": "retrying", "attempt": attempt, "of": retries + 1,
                                     "reason": exc.data.get("reason"), "error": str(exc)})
                    job.message = (f"trainer died ({exc.data.get('reason')}); attempt {attempt} "
                                   f"of {retries + 1} from the last checkpoint")
                if self.ray_trainer is not None:
                    # [ray]: Ray's scheduler places the trainer, no local lease (docs/scale.md).
                    job.message = "submitted to the Ray cluster"

                    def on_placed(placements: Any) -> None:
                        job.message = f"training on {describe_placements(placements)}"

                    async def attempt(run: TrainJobSpec) -> TrainerOutcome:
                        result: TrainerOutcome = await self.ray_trainer(
                            run, on_event=on_event, log_path=log_path, on_position=on_position,
                            on_placed=on_placed, residents=self.engines.co_located)
                        return result

                    outcome = await retrying(spec, retries, attempt, on_retry=on_retry)
                else:
                    job.message = "waiting for a device lease"
                    lease = await device_held.enter_async_context(self.leases.lease(
                        f"train:{job.job_id}", device=runtime.cluster.config.training.device,
                        on_position=on_position))
                    device = lease.device
                    job.message = "training" + (f" (engines asleep: {', '.join(r.name for r in lease.slept)})"
                                                if lease.slept else "")
                    # The trainer sees only its leased GPU (else the HF Trainer takes every one).
                    env = ({**os.environ, "CUDA_VISIBLE_DEVICES": str(device.index)}
                           if device.kind == "cuda" else None)

                    async def attempt(run: TrainJobSpec) -> TrainerOutcome:
                        return await run_trainer(run, on_event=on_event, log_path=log_path,
                                                 env=env, warm=self.warm_trainer)

                    try:
                        outcome = await retrying(spec, retries, attempt, on_retry=on_retry)
                    finally:
                        await lease.wake_residents()  # shielded and bounded
                trained_at = time.monotonic()
                stopped = outcome.stopped
                if stopped is None or stopped.reason not in ("completed", "plateau"):
                    reason = stopped.reason if stopped else "no stop event"
                    raise TrainerError(f"training ended without a usable adapter: {reason}"
                                       + (f" ({stopped.detail})" if stopped and stopped.detail else ""),
                                       data={"reason": reason, "stderr_tail": list(outcome.stderr_tail)})
                if outcome.adapter is None or outcome.adapter_path is None:
                    raise TrainerError("the trainer reported success but saved no adapter",
                                       data={"stderr_tail": list(outcome.stderr_tail)})
                manifest_bytes = msgspec.json.format(_encoder.encode(manifest), indent=2)
                await anyio.to_thread.run_sync(atomic_write_bytes, outcome.adapter_path / TRAINING_MANIFEST, manifest_bytes)
                adapter = f"iter-{iteration}"
                adapter_manifest = outcome.adapter
                await anyio.to_thread.run_sync(runtime.record, IterationAdvanced(
                    iteration=iteration, adapter=adapter, adapter_hash=adapter_manifest.adapter_sha256,
                    train_job=job.job_id, source_eval_tag=params.eval_tag,
                    training_manifest_sha256=sha256_hex(manifest_bytes), stop_reason=stopped.reason,
                    steps=stopped.step))
            except BaseException as exc:
                with anyio.CancelScope(shield=True):
                    failed = TrainFailed(job_id=job.job_id, error=failure_of(exc), iteration=iteration)
                    await anyio.to_thread.run_sync(runtime.record, failed)
                raise
            finally:
                # Shielded: a cancelled job must still leave no checkpoints behind.
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(shutil.rmtree, Path(spec.work_dir) / "checkpoints", True)
            result: dict[str, Any] = {"iteration": iteration, "adapter": adapter, "stop_reason": stopped.reason,
                                      "steps": stopped.step, "adapter_hash": adapter_manifest.adapter_sha256}
            hot = await self._hot_load(runtime, adapter, outcome.adapter_path, trained_at)
            result.update(hot)
        if params.follow_up_eval and "hot_load_error" not in hot:
            source = read_summary(runtime, params.eval_tag)
            eval_job, plan = self.evals.start(EvalRunParams(cluster=runtime.cluster.name, type=source.type,  # type: ignore[arg-type]
                                                            quick=source.quick, adapter=adapter))
            result["follow_up_eval"] = {"job_id": eval_job.job_id, "tag": plan.tag}
        return result

    async def _hot_load(self, runtime: ClusterRuntime, adapter: str, path: Path, trained_at: float) -> dict[str, Any]:
        """Load the adapter into the engine (awake again: the lease woke it) and time train
        end -> first answer from it."""
        try:
            self.engines.engine_for(runtime.cluster.name)
        except Exception as exc:
            return {"hot_load_error": str(exc)}
        try:
            async with self.engines.serving(runtime.cluster.name):
                # Loads, replays the trainer's canaries, records adapter.checked; a mismatch
                # unloads the adapter and raises, so no follow-up eval uses it.
                _, check = await load_verified(runtime, self.engines, adapter, path, "hot_load")
        except Exception as exc:
            log.exception("hot load failed", cluster=runtime.cluster.name, adapter=adapter)
            failed: dict[str, Any] = {"hot_load_error": str(exc)}
            if isinstance(exc, ModelsmithError) and exc.data.get("reason") == "canary_mismatch":
                failed["canary"] = exc.data.get("canary")
            return failed
        return {"hot_load_seconds": round(time.monotonic() - trained_at, 3),
                "canary_check": check.status}

    # -- RPC ---------------------------------------------------------------------------
    def register(self, table: MethodTable) -> None:
        async def train_start(params: TrainStartParams, ctx: CallContext) -> TrainStarted:
            from modelsmith.loop.jobs.registry import new_job_id

            job_id = new_job_id()
            prepared = await anyio.to_thread.run_sync(self.prepare, params, job_id)
            job, spec = self.start(params, job_id, prepared)
            return TrainStarted(job_id=job.job_id, status="queued", cluster=params.cluster,
                                estimated_duration_minutes=estimate_duration_minutes(spec),
                                iteration=self.fleet.get(params.cluster).iteration + 1,
                                scenarios=len(spec.scenarios), log=job.log_path or "")

        async def train_status(params: TrainJobRef, ctx: CallContext) -> TrainStatus:
            job = self.jobs.get(params.job_id)
            if job.kind != "train":
                raise NotFound(f"job {params.job_id} is not a training job", data={"job_id": params.job_id})
            metrics = [e.data for e in job.events if e.kind == "metric"]
            stop = next((e.data for e in reversed(job.events) if e.data.get("event") == "stopped"), None)
            result = job.result or {}
            return TrainStatus(job=job.summary(), iteration=result.get("iteration"),
                               step=metrics[-1]["step"] if metrics else None, total_steps=job.progress_total,
                               stop_reason=stop.get("reason") if stop else None, metrics=metrics,
                               adapter=result.get("adapter"), follow_up_eval=result.get("follow_up_eval"))

        async def train_cancel(params: TrainCancelParams, ctx: CallContext) -> JobSummary:
            job = self.jobs.get(params.job_id)
            if job.kind != "train":
                raise NotFound(f"job {params.job_id} is not a training job", data={"job_id": params.job_id})
            return self.jobs.cancel(params.job_id).summary()

        async def diagnose_run(params: DiagnoseParams, ctx: CallContext) -> Diagnosis:
            runtime = self.fleet.get(params.cluster)

            return await anyio.to_thread.run_sync(diagnose_eval, runtime, params.tag)

        table.add("train.start", TrainStartParams, train_start, "Start GRPO on an eval's core failures.")
        table.add("train.status", TrainJobRef, train_status, "Progress and metric history of a training job.")
        table.add("train.cancel", TrainCancelParams, train_cancel, "Stop a training job (the trainer saves).")
        table.add("diagnose.run", DiagnoseParams, diagnose_run, "Failure patterns of an eval.")


def synthetic_for_eval(runtime: ClusterRuntime, catalog: ScenarioCatalog, eval_tag: str) -> list[Scenario]:
    """The synthetic scenarios whose provenance names one of ``eval_tag``'s failure patterns."""
    from modelsmith.loop.synth.governance import read_provenance

    patterns = {p.pattern for p in diagnose_eval(runtime, eval_tag).patterns}
    return select_synthetic(catalog, read_provenance(runtime.cluster.scenarios_dir), patterns)
