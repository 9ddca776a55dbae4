"""Data-parallel training jobs (``[training] num_workers`` > 1) as Ray Train's TorchTrainer.

:func:`fit` runs in the coordinating :class:`~modelsmith.gpu.ray_trainer.TrainerActor` (in a
worker thread: ``TorchTrainer.fit`` blocks). Ray Train places ``num_workers`` workers, each with
the ``[ray.trainer]`` share (a placement group: one node or several, Ray decides), and runs
:func:`worker_loop` on each. A worker:

1. sends its placement (node, GPU ids) to the coordinator, which relays it to the daemon; the
   daemon puts the engines sharing those GPUs to sleep, then releases the rank;
2. learns where the trainers' own ``torch.distributed`` group meets: rank 0 offers a free port
   on its node through the coordinator;
3. runs the same trainer child as one box does (:func:`~modelsmith.gpu.ray_rank.run_rank`)
   with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set, so
   transformers' Trainer (through accelerate) trains with DistributedDataParallel: gloo on CPUs,
   NCCL on GPUs. Ray Train's own process group (set up by its TorchConfig) is not used by the
   child; each child dies with its worker (a parent-death signal).

Rank 0 speaks for the job: its events, checkpoints and adapter travel to the daemon exactly as a
single trainer's do. The ranks take their stop decisions together (the trainer's callbacks
all-reduce their stop flags each step), so no rank waits forever in a collective another left.
A worker that fails pushes its error; a worker or node that dies is reported by Ray Train as a
:class:`ray.train.WorkerGroupError`, which becomes a TrainerError with reason ``worker_died``
(``[training] retries`` runs the job again, from its last checkpoint, on all ranks).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import uuid
from pathlib import Path
from typing import Any

import anyio

from modelsmith.errors import TrainerError, error_envelope
from modelsmith.gpu.ray_artifacts import ArtifactPack
from modelsmith.gpu.trainer_process import TrainerProcess
from modelsmith.gpu.trainer_spec import TrainJobSpec

__all__ = ["fit", "worker_loop"]

_STOP_POLL_S = 1.0


def fit(spec: TrainJobSpec, shared: bool, checkpoint: tuple[str, ArtifactPack] | None,
        options: dict[str, Any], coordinator: Any, root: Path) -> dict[str, Any] | None:
    """Run the job on ``spec.num_workers`` Ray Train workers to its end (blocking); the error
    envelope to send when the worker group failed, None when it finished."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig, WorkerGroupError
    from ray.train.torch import TorchConfig, TorchTrainer

    gpus = float(options.get("num_gpus", 0.0))
    per_worker: dict[str, float] = {"CPU": float(options.get("num_cpus", 1.0))}
    if gpus > 0:
        per_worker["GPU"] = gpus
    if options.get("memory"):
        per_worker["memory"] = float(options["memory"])
    per_worker.update(options.get("resources") or {})
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"spec": spec, "shared": shared, "checkpoint": checkpoint,
                           "coordinator": coordinator},
        scaling_config=ScalingConfig(num_workers=spec.num_workers, use_gpu=gpus > 0,
                                     resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if gpus > 0 else "gloo"),
        # Retries are the daemon's ([training] retries, from the daemon's checkpoint), and Ray
        # Train keeps nothing: the run's directory is this node's scratch.
        run_config=RunConfig(name=f"modelsmith-{spec.job_id}-{uuid.uuid4().hex[:8]}",
                             storage_path=str(root / "ray-train"),
                             failure_config=FailureConfig(max_failures=0)),
    )
    try:
        trainer.fit()
    except WorkerGroupError as exc:
        died = {rank: type(failure).__name__ for rank, failure in exc.worker_failures.items()
                if _died(failure)}
        reason = "worker_died" if died else "failed"
        return error_envelope(TrainerError(
            f"data-parallel trainer for job {spec.job_id}: "
            + (f"worker(s) {sorted(died)} died" if died else "a worker failed")
            + f" ({'; '.join(f'rank {r}: {_short(f)}' for r, f in exc.worker_failures.items())})",
            data={"job_id": spec.job_id, "reason": reason, "ranks": sorted(exc.worker_failures)}))
    except Exception as exc:  # the controller or the placement group
        return error_envelope(TrainerError(
            f"data-parallel trainer for job {spec.job_id} failed in Ray Train: {_short(exc)}",
            data={"job_id": spec.job_id, "reason": "ray"}))
    return None


def _died(failure: BaseException) -> bool:
    from ray.exceptions import ActorDiedError, RayActorError

    if isinstance(failure, RayActorError | ActorDiedError):
        return True
    # A trainer child killed from outside on that worker (reason "killed") counts as a death.
    data = getattr(failure, "data", None)
    return isinstance(data, dict) and data.get("reason") in ("killed", "worker_died")


def _short(failure: BaseException) -> str:
    text = str(failure).strip().splitlines()
    return f"{type(failure).__name__}: {text[-1][:300] if text else ''}"


def worker_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: placement, release, rendezvous, then its rank's trainer child."""
    import ray
    import ray.train

    from modelsmith.gpu.ray_rank import child_env, placement_dict

    context = ray.train.get_context()
    rank = context.get_world_rank()
    coordinator = config["coordinator"]
    ray.get(coordinator.push.remote(("placed", (rank, placement_dict()))))
    if not ray.get(coordinator.released.remote(rank)):
        return  # the job was stopped before this rank started
    if rank == 0:
        ray.get(coordinator.set_master.remote((placement_dict()["node_ip"], _free_port())))
    address, port = ray.get(coordinator.master.remote())
    env = {**child_env(), "MASTER_ADDR": str(address), "MASTER_PORT": str(port),
           "RANK": str(rank), "WORLD_SIZE": str(context.get_world_size()),
           "LOCAL_RANK": str(context.get_local_rank()),
           "LOCAL_WORLD_SIZE": str(context.get_local_world_size()),
           "NODE_RANK": str(context.get_node_rank())}
    root = Path(os.environ.get("TMPDIR", "/tmp")) / f"modelsmith-ray-{config['spec'].job_id}-rank{rank}-{uuid.uuid4().hex[:8]}"
    root.mkdir(parents=True)
    try:
        anyio.run(_rank_main, config, rank, env, root)
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


async def _rank_main(config: dict[str, Any], rank: int, env: dict[str, str], root: Path) -> None:
    from modelsmith.gpu.ray_rank import run_rank

    coordinator = config["coordinator"]
    held: list[TrainerProcess] = []

    async def push(item: tuple[str, Any]) -> None:
        await coordinator.push.remote(item)

    async def watch_stop() -> None:
        while True:
            await anyio.sleep(_STOP_POLL_S)
            if await coordinator.stopping.remote():
                for process in held:
                    if process.pid is not None:
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.killpg(process.pid, signal.SIGTERM)
                return

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch_stop)
        try:
            await run_rank(config["spec"], shared=config["shared"],
                           checkpoint=config["checkpoint"], root=root, push=push, rank=rank,
                           env=env, hold=held.append)
        finally:
            tg.cancel_scope.cancel()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return int(probe.getsockname()[1])
