"""A training job as a Ray actor with the resources it needs; artifacts back verified by hash.

:class:`RayTrainerRunner` is the Ray counterpart of :func:`modelsmith.gpu.trainer_process.run_trainer`
(same arguments, same :class:`~modelsmith.gpu.trainer_process.TrainerOutcome`): it refuses a job
no node can ever hold (:class:`~modelsmith.gpu.ray_backend.Unplaceable`), shows its position
while Ray has not placed it, starts one :class:`TrainerActor` per attempt, and streams the
trainer's events into ``on_event`` and the job's log as the local child would.

On the node the actor runs the same trainer child (:class:`~modelsmith.gpu.trainer_process.TrainerProcess`).
With ``[ray] shared_storage`` the child reads and writes the spec's own paths (the home is
mounted alike on every node); otherwise it works in a node-local directory, and each checkpoint
and the final adapter travel back through the object store
(:mod:`modelsmith.gpu.ray_artifacts`): the daemon writes them into the job's ``work_dir`` and
``<cluster>/adapters/iter-N`` only after every file matched its hash, then checks the adapter's
manifest against the trainer's ``adapter_saved`` event, exactly as for a local run.

Faults: a trainer actor whose process or node dies is a TrainerError (``reason``
"worker_died"); with ``[ray.trainer] retries`` left, the job runs again with ``resume = true``
from the last checkpoint that reached the daemon (or the shared path). The outcome is returned
once, so the ledger records the job's end once, whatever the attempts.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from modelsmith.errors import ModelsmithError, TrainerError, ValidationError
from modelsmith.gpu.adapters import verify_adapter
from modelsmith.gpu.leases import Device, Lease, Resident
from modelsmith.gpu.ray_artifacts import ArtifactPack, pack, unpack
from modelsmith.gpu.ray_backend import (
    PendingQueue,
    Placement,
    RayRequest,
    connect,
    describe_placements,
    ensure_placeable,
    gib,
)
from modelsmith.gpu.ray_config import RaySection
from modelsmith.gpu.ray_rank import (
    CHECKPOINTS,
    child_env,
    placement_dict,
    plain_name,
    run_rank,
)
from modelsmith.gpu.trainer_process import (
    TrainerEventHandler,
    TrainerOutcome,
    TrainerProcess,
    note_event,
)
from modelsmith.gpu.trainer_spec import (
    AdapterSaved,
    TrainerFailed,
    TrainerStopped,
    TrainJobSpec,
    decode_spec,
    encode_spec,
)

__all__ = ["RayTrainerRunner", "TrainerActor"]

_STOP_S = 60.0


class RayTrainerRunner:
    """Runs training jobs on the Ray cluster of ``config`` (see the module docstring)."""

    def __init__(self, config: RaySection) -> None:
        self.config = config
        self.queue = PendingQueue()
        self.placements: dict[str, list[Placement]] = {}  # job id -> where its ranks run now
        self.actors: dict[str, Any] = {}  # job id -> its attempt's actor handle

    def request(self, spec: TrainJobSpec) -> RayRequest:
        """One trainer's share, ``spec.num_workers`` times (Ray Train's workers: any nodes)."""
        section = self.config.trainer
        return RayRequest(what=f"trainer {spec.job_id}", num_cpus=section.num_cpus,
                          num_gpus=section.num_gpus, memory_bytes=gib(section.memory_gb),
                          resources=section.resources, count=spec.num_workers)

    async def __call__(self, spec: TrainJobSpec, *, on_event: TrainerEventHandler, log_path: Path,
                       on_position: Callable[[int | None], None] | None = None,
                       on_placed: Callable[[list[Placement]], None] | None = None,
                       residents: Callable[[Placement], list[Resident]] | None = None,
                       ) -> TrainerOutcome:
        """One attempt (``[training] retries`` are the caller's: TrainService). ``residents``
        names the engines sharing a GPU with a rank's placement: they sleep before that rank's
        trainer starts and wake when the attempt ends, however it ends."""
        await connect(self.config)
        request = self.request(spec)
        await ensure_placeable(request)  # Unplaceable now rather than waiting forever
        return await self._attempt(spec, request, on_event, Path(log_path), on_position,
                                   on_placed, residents)

    async def _attempt(self, spec: TrainJobSpec, request: RayRequest,
                       on_event: TrainerEventHandler, log_path: Path,
                       on_position: Callable[[int | None], None] | None,
                       on_placed: Callable[[list[Placement]], None] | None,
                       residents: Callable[[Placement], list[Resident]] | None,
                       ) -> TrainerOutcome:
        import ray
        from ray.exceptions import RayActorError, RayError

        shared = self.config.shared_storage
        checkpoint = None
        if spec.resume and not shared:
            checkpoint = await anyio.to_thread.run_sync(_latest_checkpoint_pack, spec)
        data_parallel = spec.num_workers > 1
        # Data parallel: a coordinating actor (no GPU) runs Ray Train's TorchTrainer, whose
        # workers take the trainer's share each; else the actor takes it and trains itself.
        options = {"num_cpus": 0} if data_parallel else request.options()
        actor: Any = ray.remote(TrainerActor).options(**options, max_restarts=0).remote()
        self.queue.add(spec.job_id, on_position)
        self.actors[spec.job_id] = actor
        placed: dict[int, Placement] = {}
        # The engines slept for this attempt's ranks; woken (shielded, bounded) at its end.
        asleep = Lease(Device(index=-1, kind="ray", name=f"ray:{spec.job_id}",
                              memory_total_mb=None), [])
        stream: Any = None
        state = _Streamed()
        try:
            stream = actor.train.options(num_returns="streaming").remote(
                encode_spec(spec), shared, checkpoint,
                request.options() if data_parallel else None)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with log_path.open("ab") as log:
                async for ref in stream:
                    kind, payload = await ref
                    if kind == "placed":
                        rank, where = payload
                        placed[rank] = Placement(**where)
                        if len(placed) == spec.num_workers:
                            self.queue.placed(spec.job_id)
                        await _sleep_for(placed[rank], residents, asleep)
                        ordered = [placed[r] for r in sorted(placed)]
                        self.placements[spec.job_id] = ordered
                        if on_placed is not None:
                            on_placed(ordered)
                        await actor.release.remote(rank)  # that rank's trainer may start now
                    else:
                        await self._receive(kind, payload, spec, log, on_event, state)
        except RayActorError as exc:
            raise TrainerError(
                f"trainer for job {spec.job_id} died on the Ray cluster (its worker or node is "
                f"gone): {type(exc).__name__}",
                data={"job_id": spec.job_id, "reason": "worker_died",
                      "node": describe_placements(list(placed.values())) if placed else None}
            ) from exc
        except RayError as exc:
            raise TrainerError(f"trainer for job {spec.job_id} failed in Ray: {type(exc).__name__}",
                               data={"job_id": spec.job_id, "reason": "ray"}) from exc
        except BaseException:
            if stream is not None:
                # Cancelled: the actor SIGTERMs the trainers, which checkpoint (bounded).
                with anyio.CancelScope(shield=True), anyio.move_on_after(_STOP_S), \
                        contextlib.suppress(Exception):
                    await actor.stop.remote()
            raise
        finally:
            self.queue.placed(spec.job_id)
            self.placements.pop(spec.job_id, None)
            self.actors.pop(spec.job_id, None)
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
            await asleep.wake_residents()
        return await self._outcome(spec, state)

    async def _receive(self, kind: str, payload: Any, spec: TrainJobSpec, log: Any,
                       on_event: TrainerEventHandler, state: _Streamed) -> None:
        if kind == "event":
            log.write(payload + b"\n")
            log.flush()
            event = note_event(payload, state)
            if event is None:
                return
            result = on_event(event)
            if inspect.isawaitable(result):
                await result
        elif kind == "checkpoint":
            name, artifact = payload
            target = Path(spec.work_dir) / CHECKPOINTS / plain_name(name)
            if not await anyio.Path(target).exists():
                await anyio.to_thread.run_sync(unpack, artifact, target)
        elif kind == "adapter":
            state.adapter_pack = payload
        elif kind == "exit":
            state.exit_code, state.stderr_tail = payload
        elif kind == "error":  # the trainer's own failure on the node (exit code, stderr tail)
            data = payload.get("data") if isinstance(payload.get("data"), dict) else {}
            raise TrainerError(str(payload.get("message")), data={**data, "job_id": spec.job_id})

    async def _outcome(self, spec: TrainJobSpec, state: _Streamed) -> TrainerOutcome:
        tail = tuple(state.stderr_tail)
        if state.exit_code != 0 or state.stopped is None:
            raise TrainerError(f"trainer for job {spec.job_id} ended without a stopped event",
                               data={"job_id": spec.job_id, "exit_code": state.exit_code,
                                     "stderr_tail": list(tail)})
        manifest = None
        adapter_path = None
        if state.adapter_saved is not None:
            adapter_path = Path(spec.output_dir)
            try:
                if state.adapter_pack is not None:  # the object-store route: arrive, then verify
                    await anyio.to_thread.run_sync(unpack, state.adapter_pack, adapter_path)
                manifest = await anyio.to_thread.run_sync(verify_adapter, adapter_path)
            except ValidationError as exc:
                raise TrainerError(f"the trainer's adapter does not verify on arrival: {exc}",
                                   data={"job_id": spec.job_id, **exc.data}) from exc
            if manifest.adapter_sha256 != state.adapter_saved.sha256:
                raise TrainerError("the adapter that arrived is not the one the trainer reported",
                                   data={"job_id": spec.job_id, "file": str(adapter_path)})
        elif state.stopped.reason != "non_finite":
            raise TrainerError(f"trainer stopped ({state.stopped.reason}) without saving an "
                               "adapter", data={"job_id": spec.job_id, "stderr_tail": list(tail)})
        return TrainerOutcome(exit_code=0, stopped=state.stopped, adapter=manifest,
                              adapter_path=adapter_path, stderr_tail=tail,
                              bad_lines=state.bad_lines)


class _Streamed:
    def __init__(self) -> None:
        self.stopped: TrainerStopped | None = None
        self.adapter_saved: AdapterSaved | None = None
        self.failed: TrainerFailed | None = None
        self.adapter_pack: ArtifactPack | None = None
        self.exit_code: int | None = None
        self.stderr_tail: list[str] = []
        self.bad_lines = 0


async def _sleep_for(placement: Placement, residents: Callable[[Placement], list[Resident]] | None,
                    asleep: Lease) -> None:
    """Put the engines sharing ``placement``'s GPUs to sleep (each once per attempt)."""
    if residents is None or not placement.gpus:
        return  # on CPUs engines stay awake, as on one box: vLLM's CPU build frees nothing
    for resident in residents(placement):
        if resident not in asleep.slept:
            asleep.slept.append(resident)  # listed first: a sleep cut short is woken as well
            await resident.sleep(1)


def _latest_checkpoint_pack(spec: TrainJobSpec) -> tuple[str, ArtifactPack] | None:
    """The newest checkpoint that reached the daemon (``checkpoint-<step>``), packed."""
    root = Path(spec.work_dir) / CHECKPOINTS
    found = sorted((int(p.name.rsplit("-", 1)[1]), p) for p in root.glob("checkpoint-*")
                   if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit()) if root.is_dir() else []
    if not found:
        return None
    path = found[-1][1]
    return path.name, pack(path)


class TrainerActor:
    r"""Actor side. One rank: the trainer child on this node. Data parallel (``num_workers`` >
    1): a coordinator running Ray Train's TorchTrainer (:mod:`modelsmith.gpu.ray_train_workers`),
    whose workers send their placement and rank 0's stream through :meth:`push`. Either way a
    rank's trainer starts only once the daemon :meth:`release`\ s it (after putting the engines
    that share its GPUs to sleep)."""

    def __init__(self) -> None:
        self._process: TrainerProcess | None = None
        self._send: Any = None
        self._released: dict[int, anyio.Event] = {}
        self._master: tuple[str, int] | None = None
        self._master_known = anyio.Event()
        self._stopping = False

    def _release_event(self, rank: int) -> anyio.Event:
        return self._released.setdefault(rank, anyio.Event())

    async def release(self, rank: int) -> None:
        """The daemon: rank ``rank`` may start its trainer."""
        self._release_event(rank).set()

    async def released(self, rank: int) -> bool:
        """A worker: wait for :meth:`release`; False when the job was stopped meanwhile."""
        await self._release_event(rank).wait()
        return not self._stopping

    async def push(self, item: tuple[str, Any]) -> None:
        """A worker's item for the daemon's stream (dropped once the stream has ended)."""
        if self._send is not None:
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                await self._send.send(item)

    async def set_master(self, address: tuple[str, int]) -> None:
        """Rank 0: where the trainers' own torch.distributed group meets."""
        self._master = address
        self._master_known.set()

    async def master(self) -> tuple[str, int]:
        await self._master_known.wait()
        assert self._master is not None
        return self._master

    async def stopping(self) -> bool:
        return self._stopping

    async def train(self, spec_bytes: bytes, shared: bool,
                    checkpoint: tuple[str, ArtifactPack] | None,
                    worker_options: dict[str, Any] | None) -> AsyncIterator[tuple[str, Any]]:
        spec = decode_spec(spec_bytes)
        root = Path(tempfile.mkdtemp(prefix=f"modelsmith-ray-{spec.job_id}-"))
        send, receive = anyio.create_memory_object_stream[tuple[str, Any]](max_buffer_size=1024)
        self._send = send

        async def one_rank() -> None:
            async with send:
                await send.send(("placed", (0, placement_dict())))
                if not await self.released(0):
                    return

                def hold(process: TrainerProcess) -> None:
                    self._process = process

                with contextlib.suppress(ModelsmithError):  # sent as an "error" item
                    await run_rank(spec, shared=shared, checkpoint=checkpoint, root=root,
                                   push=send.send, rank=0, env=child_env(), hold=hold)

        async def data_parallel() -> None:
            from modelsmith.gpu.ray_train_workers import fit

            async with send:
                import ray

                handle = ray.get_runtime_context().current_actor
                failure = await anyio.to_thread.run_sync(
                    fit, spec, shared, checkpoint, worker_options or {}, handle, root,
                    abandon_on_cancel=True)
                if failure is not None:
                    await send.send(("error", failure))

        try:
            async with anyio.create_task_group() as tg, receive:
                tg.start_soon(data_parallel if spec.num_workers > 1 else one_rank)
                async for item in receive:
                    yield item
        finally:
            self._send = None
            shutil.rmtree(root, ignore_errors=True)

    async def stop(self) -> None:
        """SIGTERM the trainers (they checkpoint and save), bounded: this rank's child here;
        data-parallel workers see :meth:`stopping` within a second and signal theirs."""
        self._stopping = True
        for event in self._released.values():
            event.set()
        process = self._process
        if process is not None and process.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, 15)
