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
import msgspec

from modelsmith.errors import ModelsmithError, TrainerError, ValidationError, error_envelope
from modelsmith.gpu.adapters import verify_adapter
from modelsmith.gpu.ray_artifacts import ArtifactPack, pack, unpack
from modelsmith.gpu.ray_backend import (
    PendingQueue,
    Placement,
    RayRequest,
    connect,
    current_placement,
    ensure_placeable,
    gib,
)
from modelsmith.gpu.ray_config import RaySection
from modelsmith.gpu.trainer_process import (
    TrainerEventHandler,
    TrainerOutcome,
    TrainerProcess,
    note_event,
)
from modelsmith.gpu.trainer_spec import (
    AdapterSaved,
    TrainerCheckpoint,
    TrainerFailed,
    TrainerStopped,
    TrainJobSpec,
    decode_spec,
    encode_spec,
)

__all__ = ["RayTrainerRunner", "TrainerActor"]

_STOP_S = 60.0
_CHECKPOINTS = "checkpoints"


class RayTrainerRunner:
    """Runs training jobs on the Ray cluster of ``config`` (see the module docstring)."""

    def __init__(self, config: RaySection) -> None:
        self.config = config
        self.queue = PendingQueue()
        self.placements: dict[str, Placement] = {}  # job id -> where its attempt runs now
        self.actors: dict[str, Any] = {}  # job id -> its attempt's actor handle

    def request(self, spec: TrainJobSpec) -> RayRequest:
        section = self.config.trainer
        return RayRequest(what=f"trainer {spec.job_id}", num_cpus=section.num_cpus,
                          num_gpus=section.num_gpus, memory_bytes=gib(section.memory_gb),
                          resources=section.resources)

    async def __call__(self, spec: TrainJobSpec, *, on_event: TrainerEventHandler, log_path: Path,
                       on_position: Callable[[int | None], None] | None = None,
                       on_placed: Callable[[Placement], None] | None = None) -> TrainerOutcome:
        await connect(self.config)
        request = self.request(spec)
        await ensure_placeable(request)  # Unplaceable now rather than waiting forever
        attempts = self.config.trainer.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return await self._attempt(spec if attempt == 1 else _resumed(spec), request,
                                           on_event, Path(log_path), on_position, on_placed)
            except TrainerError as exc:
                if exc.data.get("reason") != "worker_died" or attempt == attempts:
                    exc.data["attempts"] = attempt
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _attempt(self, spec: TrainJobSpec, request: RayRequest,
                       on_event: TrainerEventHandler, log_path: Path,
                       on_position: Callable[[int | None], None] | None,
                       on_placed: Callable[[Placement], None] | None) -> TrainerOutcome:
        import ray
        from ray.exceptions import RayActorError, RayError

        shared = self.config.shared_storage
        checkpoint = None
        if spec.resume and not shared:
            checkpoint = await anyio.to_thread.run_sync(_latest_checkpoint_pack, spec)
        actor: Any = ray.remote(TrainerActor).options(**request.options(), max_restarts=0).remote()
        self.queue.add(spec.job_id, on_position)
        stream: Any = None
        placed: Placement | None = None
        state = _Streamed()
        try:
            try:
                placed = Placement(**await actor.start.remote())
            finally:
                self.queue.placed(spec.job_id)
            self.placements[spec.job_id] = placed
            self.actors[spec.job_id] = actor
            if on_placed is not None:
                on_placed(placed)
            stream = actor.train.options(num_returns="streaming").remote(
                encode_spec(spec), shared, checkpoint)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with log_path.open("ab") as log:
                async for ref in stream:
                    kind, payload = await ref
                    await self._receive(kind, payload, spec, log, on_event, state)
        except RayActorError as exc:
            raise TrainerError(
                f"trainer for job {spec.job_id} died on the Ray cluster (its worker or node is "
                f"gone): {type(exc).__name__}",
                data={"job_id": spec.job_id, "reason": "worker_died",
                      "node": placed.describe() if placed is not None else None}) from exc
        except RayError as exc:
            raise TrainerError(f"trainer for job {spec.job_id} failed in Ray: {type(exc).__name__}",
                               data={"job_id": spec.job_id, "reason": "ray"}) from exc
        except BaseException:
            if stream is not None:
                # Cancelled: the actor SIGTERMs the child, which checkpoints (bounded).
                with anyio.CancelScope(shield=True), anyio.move_on_after(_STOP_S), \
                        contextlib.suppress(Exception):
                    await actor.stop.remote()
            raise
        finally:
            self.placements.pop(spec.job_id, None)
            self.actors.pop(spec.job_id, None)
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
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
            target = Path(spec.work_dir) / _CHECKPOINTS / _plain_name(name)
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


def _resumed(spec: TrainJobSpec) -> TrainJobSpec:
    return msgspec.structs.replace(spec, resume=True)


def _plain_name(name: str) -> str:
    if not name or "/" in name or name in (".", ".."):
        raise ValidationError(f"bad checkpoint name {name!r}", data={"field": "checkpoint"})
    return name


def _latest_checkpoint_pack(spec: TrainJobSpec) -> tuple[str, ArtifactPack] | None:
    """The newest checkpoint that reached the daemon (``checkpoint-<step>``), packed."""
    root = Path(spec.work_dir) / _CHECKPOINTS
    found = sorted((int(p.name.rsplit("-", 1)[1]), p) for p in root.glob("checkpoint-*")
                   if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit()) if root.is_dir() else []
    if not found:
        return None
    path = found[-1][1]
    return path.name, pack(path)


class TrainerActor:
    """Actor side: one trainer child on this node, its events streamed to the daemon."""

    def __init__(self) -> None:
        self._process: TrainerProcess | None = None
        self._root: Path | None = None

    async def start(self) -> dict[str, Any]:
        placed = current_placement()
        return {"node_id": placed.node_id, "node_ip": placed.node_ip, "gpus": placed.gpus}

    async def train(self, spec_bytes: bytes, shared: bool,
                    checkpoint: tuple[str, ArtifactPack] | None) -> AsyncIterator[tuple[str, Any]]:
        spec = decode_spec(spec_bytes)
        self._root = Path(tempfile.mkdtemp(prefix=f"modelsmith-ray-{spec.job_id}-"))
        python = _python_dying_with_parent(self._root)
        if not shared:  # node-local paths; artifacts travel back through the object store
            spec = msgspec.structs.replace(spec, work_dir=str(self._root / "work"),
                                           output_dir=str(self._root / "adapter"))
            if checkpoint is not None:
                name, artifact = checkpoint
                unpack(artifact, Path(spec.work_dir) / _CHECKPOINTS / _plain_name(name))
        send, receive = anyio.create_memory_object_stream[tuple[str, Any]](max_buffer_size=1024)

        def on_event(event: Any) -> None:
            line = msgspec.json.encode(event)
            send.send_nowait(("event", line))
            if isinstance(event, TrainerCheckpoint) and not shared:
                path = Path(event.path)
                send.send_nowait(("checkpoint", (path.name, pack(path))))

        log_path = Path(spec.work_dir) / "ray-trainer.log"
        process = TrainerProcess(spec=spec, on_event=on_event, log_path=log_path,
                                 env=_child_env(), python=python)
        self._process = process

        async def run() -> None:
            async with send:
                try:
                    # Exit 0 here means the child's adapter verified against its manifest on
                    # this node; the daemon verifies it again where it arrives.
                    await process.run()
                    if not shared and process.adapter_saved is not None:
                        adapter = await anyio.to_thread.run_sync(pack, Path(spec.output_dir))
                        await send.send(("adapter", adapter))
                    await send.send(("exit", (0, list(process.stderr_tail))))
                except ModelsmithError as exc:
                    await send.send(("error", error_envelope(exc)))

        try:
            async with anyio.create_task_group() as tg, receive:
                tg.start_soon(run)
                async for item in receive:
                    yield item
        finally:
            if self._root is not None:
                shutil.rmtree(self._root, ignore_errors=True)

    async def stop(self) -> None:
        """SIGTERM the trainer child (it checkpoints and saves), bounded."""
        process = self._process
        if process is not None and process.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, 15)


# The trainer child gets SIGTERM (it checkpoints and exits) when the actor's process dies: a
# SIGKILLed Ray worker would otherwise leave it training, and holding its GPU, on the node.
# PR_SET_PDEATHSIG (1) survives the exec into the real interpreter.
_PDEATHSIG = ("import ctypes, os, signal, sys\n"
              "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"
              "if os.getppid() != int(os.environ['MODELSMITH_PARENT_PID']): sys.exit(1)\n"
              "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n")


def _python_dying_with_parent(directory: Path) -> str:
    """An executable that runs ``python ARGS`` with the parent-death signal set (Linux)."""
    import shlex
    import sys

    script = directory / "python-dying-with-parent"
    script.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c {shlex.quote(_PDEATHSIG)}"
                      ' "$@"\n')
    script.chmod(0o755)
    return str(script)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["MODELSMITH_PARENT_PID"] = str(os.getpid())
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env

