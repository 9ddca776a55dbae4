"""One trainer child kept warm: started with its imports done, waiting for the next job.

``python -m modelsmith.gpu.trainer --warm`` imports torch, transformers, TRL and PEFT and then
blocks on a line on stdin. :class:`WarmTrainer` holds at most one such child;
:meth:`WarmTrainer.take` hands it to :class:`~modelsmith.gpu.trainer_process.TrainerProcess`
(which sends the job and supervises it as it would a cold child) and :meth:`WarmTrainer.start`
launches the next one after a job. The fixed start-up cost (several seconds of imports) then runs
between jobs instead of inside one.

Resources: the child's stdin is a pipe from the daemon, so if the daemon dies the child reads EOF
and exits; :meth:`aclose` kills a waiting child (its process group) at once. A child that died
while waiting is discarded by :meth:`take` and the job starts cold.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import anyio
from anyio.abc import Process

__all__ = ["WarmTrainer", "warm_command"]

_KILL_WAIT_SECONDS = 10.0


def warm_command(python: str) -> list[str]:
    return [python, "-m", "modelsmith.gpu.trainer", "--warm"]


def _warm_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


@dataclass
class WarmTrainer:
    """At most one waiting trainer child; see the module docstring."""

    python: str = sys.executable
    enabled: bool = True
    _process: Process | None = None

    @property
    def ready(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def start(self) -> None:
        """Launch a warm child unless one is waiting (returns at once; it imports meanwhile)."""
        if not self.enabled or self.ready:
            return
        await self._discard()
        self._process = await anyio.open_process(
            warm_command(self.python),
            stdin=subprocess.PIPE,
            env=_warm_env(),
            start_new_session=True,
        )

    async def take(self) -> Process | None:
        """The waiting child, now the caller's; None when there is none (start cold)."""
        process, self._process = self._process, None
        if process is not None and process.returncode is not None:
            await _kill(process)
            return None
        return process

    async def aclose(self) -> None:
        await self._discard()

    async def _discard(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            await _kill(process)


async def _kill(process: Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with anyio.CancelScope(shield=True), anyio.move_on_after(_KILL_WAIT_SECONDS):
        await process.aclose()
