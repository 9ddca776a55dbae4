"""One rank of a training job on a Ray node: the trainer child the :class:`TrainerActor` (rank 0
of a single-worker job) and each Ray Train worker (:mod:`modelsmith.gpu.ray_train_workers`) run.

It lives apart from both so neither imports the other: the actor drives Ray Train, the workers
run ranks, and this module knows only the trainer child, its paths and its environment.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import msgspec

from modelsmith.errors import ModelsmithError, ValidationError, error_envelope
from modelsmith.gpu.ray_artifacts import ArtifactPack, pack, unpack
from modelsmith.gpu.ray_backend import current_placement
from modelsmith.gpu.trainer_process import TrainerProcess
from modelsmith.gpu.trainer_spec import TrainerCheckpoint, TrainJobSpec

__all__ = ["CHECKPOINTS", "child_env", "placement_dict", "plain_name", "rank_spec", "run_rank"]

CHECKPOINTS = "checkpoints"


def plain_name(name: str) -> str:
    """A checkpoint's directory name as a node sent it: one path component, or ValidationError."""
    if not name or "/" in name or "\x00" in name or name in (".", "..") or len(name) > 255:
        raise ValidationError(f"bad checkpoint name {name[:80]!r}", data={"field": "checkpoint"})
    return name


def placement_dict() -> dict[str, Any]:
    placed = current_placement()
    return {"node_id": placed.node_id, "node_ip": placed.node_ip, "gpus": placed.gpus}


def rank_spec(spec: TrainJobSpec, *, shared: bool, root: Path, rank: int) -> TrainJobSpec:
    """The spec one rank's trainer runs. On shared storage rank 0 reads and writes the job's own
    paths; every other case works in ``root`` on this node. A rank > 0 on shared storage sees
    the job's checkpoints through a link (the HF Trainer writes its ``rng_state_<rank>`` there
    and every rank resumes from the same step)."""
    if shared and rank == 0:
        return spec
    local = msgspec.structs.replace(spec, work_dir=str(root / "work"),
                                    output_dir=str(root / "adapter"))
    if shared:
        checkpoints = Path(spec.work_dir) / CHECKPOINTS
        checkpoints.mkdir(parents=True, exist_ok=True)
        Path(local.work_dir).mkdir(parents=True, exist_ok=True)
        (Path(local.work_dir) / CHECKPOINTS).symlink_to(checkpoints, target_is_directory=True)
    return local


async def run_rank(spec: TrainJobSpec, *, shared: bool, checkpoint: tuple[str, ArtifactPack] | None,
                   root: Path, push: Callable[[tuple[str, Any]], Awaitable[None]], rank: int,
                   env: dict[str, str], hold: Callable[[TrainerProcess], None] | None = None) -> None:
    """One rank's trainer child on this node, to its end. Rank 0 pushes its events, each
    checkpoint and the adapter (packed, off shared storage), then ``exit``; a rank whose
    trainer fails pushes ``error`` and raises its ModelsmithError."""
    spec = await anyio.to_thread.run_sync(
        functools.partial(rank_spec, spec, shared=shared, root=root, rank=rank))
    python = await anyio.to_thread.run_sync(_python_dying_with_parent, root)
    if checkpoint is not None and not shared:
        name, artifact = checkpoint
        await anyio.to_thread.run_sync(
            unpack, artifact, Path(spec.work_dir) / CHECKPOINTS / plain_name(name))

    async def on_event(event: Any) -> None:
        if rank != 0:
            return  # its own log has it; rank 0 speaks for the job
        await push(("event", msgspec.json.encode(event)))
        if isinstance(event, TrainerCheckpoint) and not shared:
            path = Path(event.path)
            await push(("checkpoint", (path.name, await anyio.to_thread.run_sync(pack, path))))

    process = TrainerProcess(spec=spec, on_event=on_event,
                             log_path=Path(spec.work_dir) / f"ray-trainer-rank{rank}.log",
                             env=env, python=python,
                             saves_adapter=rank == 0)
    if hold is not None:
        hold(process)
    try:
        # Exit 0 here means the child's adapter verified against its manifest on this node;
        # the daemon verifies it again where it arrives.
        await process.run()
    except ModelsmithError as exc:
        await push(("error", error_envelope(exc)))
        raise
    if rank == 0:
        if not shared and process.adapter_saved is not None:
            adapter = await anyio.to_thread.run_sync(pack, Path(spec.output_dir))
            await push(("adapter", adapter))
        await push(("exit", (0, list(process.stderr_tail))))


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


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["MODELSMITH_PARENT_PID"] = str(os.getpid())
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env
