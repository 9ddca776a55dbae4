"""Daemon side of the GRPO trainer: start the child, stream its events, stop it politely.

:func:`run_trainer` (or :class:`TrainerProcess`) writes the job spec into ``work_dir``, starts
``python -m modelsmith.gpu.trainer spec.json`` in its own process group, and reads its stdout
line by line: each line is appended to ``log_path`` and, when it decodes as a
:data:`~modelsmith.gpu.trainer_spec.TrainerEvent`, handed to ``on_event`` (a line that does not
decode is logged and skipped, never fatal). Stderr is written in full to
``work_dir/trainer.stderr.log`` and its last lines are kept for error reports. The child's pid is
in ``work_dir/trainer.pid`` while it runs, so a restarted daemon can find it. With a
:class:`~modelsmith.gpu.warm_trainer.WarmTrainer`, the job is sent to its waiting child (imports
done) as one JSON line on that child's stdin, and the next warm child is started after the job.

Resources and errors:

- Cancelling the calling scope sends SIGTERM to the child's process group and, shielded, keeps
  reading (events such as ``stopped``/``adapter_saved`` still reach ``on_event``) for up to
  ``cancel_grace`` seconds; then SIGKILL. The cancellation is re-raised.
- A non-zero exit raises :class:`~modelsmith.errors.TrainerError` whose ``data`` holds
  ``exit_code``, ``stderr_tail`` and the ``failed`` event's error, if any.
- Exit 0 returns a :class:`TrainerOutcome`; its adapter manifest has been verified on disk and
  matches the ``adapter_saved`` event.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

import anyio
import anyio.to_thread
import msgspec
import structlog
from anyio.abc import ByteReceiveStream, Process

from modelsmith.atomic import atomic_write_bytes, atomic_write_text
from modelsmith.errors import TrainerError, ValidationError
from modelsmith.gpu.adapters import AdapterManifest, verify_adapter
from modelsmith.gpu.trainer_spec import (
    AdapterSaved,
    TrainerEvent,
    TrainerFailed,
    TrainerStopped,
    TrainJobSpec,
    decode_event,
    encode_spec,
)
from modelsmith.gpu.warm_trainer import WarmTrainer

log = structlog.get_logger("modelsmith.trainer")

__all__ = [
    "PID_FILE",
    "RETRYABLE",
    "SPEC_FILE",
    "STDERR_FILE",
    "EndSeen",
    "TrainerEventHandler",
    "TrainerOutcome",
    "TrainerProcess",
    "note_event",
    "retrying",
    "run_trainer",
]

SPEC_FILE = "spec.json"
PID_FILE = "trainer.pid"
STDERR_FILE = "trainer.stderr.log"
STDERR_TAIL_LINES = 50
# A line longer than this is not an event; it is cut so a runaway print cannot exhaust memory.
MAX_LINE_BYTES = 1 << 20
_KILL_WAIT_SECONDS = 10.0

TrainerEventHandler = Callable[[TrainerEvent], Awaitable[None] | None]


@dataclass(frozen=True)
class TrainerOutcome:
    """How a trainer run that exited 0 ended."""

    exit_code: int
    stopped: TrainerStopped | None
    adapter: AdapterManifest | None
    adapter_path: Path | None
    stderr_tail: tuple[str, ...]
    bad_lines: int


class EndSeen(Protocol):
    """What a reader of a trainer's event lines keeps of how the run ended."""

    stopped: TrainerStopped | None
    adapter_saved: AdapterSaved | None
    failed: TrainerFailed | None
    bad_lines: int


def note_event(line: bytes, seen: EndSeen) -> TrainerEvent | None:
    """Decode one event line (None for a blank one, or one that is no event: counted in
    ``seen.bad_lines``) and keep in ``seen`` the events that decide the outcome. The local
    runner and the Ray runner read the child's stream through this one function."""
    if not line.strip():
        return None
    try:
        event = decode_event(line)
    except ValidationError:
        seen.bad_lines += 1
        return None
    if isinstance(event, TrainerStopped):
        seen.stopped = event
    elif isinstance(event, AdapterSaved):
        seen.adapter_saved = event
    elif isinstance(event, TrainerFailed):
        seen.failed = event
    return event


class _LineSplitter:
    """Bytes in, complete lines out; the partial line survives a cancelled reader."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buffer.extend(chunk)
        lines = []
        while (end := self._buffer.find(b"\n")) >= 0:
            lines.append(bytes(self._buffer[:end]))
            del self._buffer[: end + 1]
        if len(self._buffer) > MAX_LINE_BYTES:
            lines.append(bytes(self._buffer[:MAX_LINE_BYTES]))
            self._buffer.clear()
        return lines

    def rest(self) -> list[bytes]:
        rest, self._buffer = bytes(self._buffer), bytearray()
        return [rest] if rest else []


@dataclass
class TrainerProcess:
    """One trainer child from start to exit. Use :meth:`run` once."""

    spec: TrainJobSpec
    on_event: TrainerEventHandler
    log_path: Path
    python: str = sys.executable
    env: Mapping[str, str] | None = None
    cancel_grace: float = 30.0
    warm: WarmTrainer | None = None
    warm_started: bool = False
    # False for a data-parallel rank other than 0: it trains, and rank 0 saves the adapter.
    saves_adapter: bool = True
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=STDERR_TAIL_LINES))
    stopped: TrainerStopped | None = None
    adapter_saved: AdapterSaved | None = None
    failed: TrainerFailed | None = None
    bad_lines: int = 0
    pid: int | None = None
    _process: Process | None = None
    _stdout_lines: _LineSplitter = field(default_factory=_LineSplitter)
    _stderr_lines: _LineSplitter = field(default_factory=_LineSplitter)
    _log: IO[bytes] | None = None
    _stderr_log: IO[bytes] | None = None
    _deliver_events: bool = True

    @property
    def work_dir(self) -> Path:
        return Path(self.spec.work_dir)

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ if self.env is None else self.env)
        env["HF_HUB_OFFLINE"] = "1"
        env["TRANSFORMERS_OFFLINE"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        return env

    async def run(self) -> TrainerOutcome:
        """Start the child, stream it to the end, and return how it ended (see module doc)."""
        if self._process is not None:
            raise RuntimeError("a TrainerProcess runs once")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        spec_path = self.work_dir / SPEC_FILE
        atomic_write_bytes(spec_path, encode_spec(self.spec))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._stderr_log = (self.work_dir / STDERR_FILE).open("ab")
        try:
            self._process = await self._take_warm(spec_path)
            if self._process is None:
                self._process = await anyio.open_process(
                    [self.python, "-m", "modelsmith.gpu.trainer", str(spec_path)],
                    stdin=subprocess.DEVNULL,
                    env=self._child_env(),
                    # Own process group: a signal meant for the daemon's group never reaches it,
                    # and we can signal everything it started.
                    start_new_session=True,
                )
            exit_code = await self._supervise(self._process)
        finally:
            with anyio.CancelScope(shield=True):
                await self._close()
        if self.warm is not None:
            await self.warm.start()  # the next job's imports run now, between jobs
        return await self._outcome(exit_code)

    async def _take_warm(self, spec_path: Path) -> Process | None:
        """The warm child, sent this job; None when there is none or it cannot take the job."""
        if self.warm is None:
            return None
        process = await self.warm.take()
        if process is None or process.stdin is None:
            return None
        request = msgspec.json.encode({"spec": str(spec_path), "env": self._child_env()})
        try:
            await process.stdin.send(request + b"\n")
            await process.stdin.aclose()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with anyio.CancelScope(shield=True), anyio.move_on_after(_KILL_WAIT_SECONDS):
                await process.aclose()
            return None
        self.warm_started = True
        return process

    async def _supervise(self, process: Process) -> int:
        self.pid = process.pid
        atomic_write_text(self.work_dir / PID_FILE, f"{process.pid}\n")
        try:
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._pump_stderr, process)
                    await self._pump_stdout(process)
            except BaseExceptionGroup as group:
                # Only on_event can raise here: give the caller its exception, not our group.
                if len(group.exceptions) == 1:
                    raise group.exceptions[0] from None
                raise
            return await process.wait()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._terminate(process)
            raise

    async def _terminate(self, process: Process) -> None:
        """SIGTERM the group, keep reading for up to ``cancel_grace`` s, then SIGKILL."""
        if process.returncode is None:
            self._signal_group(process, signal.SIGTERM)
            with anyio.move_on_after(self.cancel_grace):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._pump_stderr, process)
                    await self._pump_stdout(process)
                    await process.wait()
        if process.returncode is None:
            self._signal_group(process, signal.SIGKILL)
            with anyio.move_on_after(_KILL_WAIT_SECONDS):
                await process.wait()
        else:
            # The leader is gone; anything it left in its group goes with it.
            self._signal_group(process, signal.SIGKILL)

    @staticmethod
    def _signal_group(process: Process, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signum)

    async def _pump_stdout(self, process: Process) -> None:
        assert process.stdout is not None
        while (chunk := await _receive(process.stdout)) is not None:
            for line in self._stdout_lines.feed(chunk):
                await self._handle_line(line)
        for line in self._stdout_lines.rest():
            await self._handle_line(line)

    async def _pump_stderr(self, process: Process) -> None:
        assert process.stderr is not None
        while (chunk := await _receive(process.stderr)) is not None:
            if self._stderr_log is not None:
                self._stderr_log.write(chunk)
                self._stderr_log.flush()
            for line in self._stderr_lines.feed(chunk):
                self.stderr_tail.append(line.decode("utf-8", "replace"))
        for line in self._stderr_lines.rest():
            self.stderr_tail.append(line.decode("utf-8", "replace"))

    async def _handle_line(self, line: bytes) -> None:
        if self._log is not None:
            self._log.write(line + b"\n")
            self._log.flush()
        event = note_event(line, self)
        if event is None or not self._deliver_events:
            return
        try:
            result = self.on_event(event)
            if inspect.isawaitable(result):
                await result
        except BaseException:
            # The handler broke: stop calling it (we are about to shut the child down).
            self._deliver_events = False
            raise

    async def _close(self) -> None:
        if self._process is not None:
            with anyio.move_on_after(_KILL_WAIT_SECONDS):
                await self._process.aclose()
            if self._process.returncode is not None:
                with contextlib.suppress(FileNotFoundError):
                    (self.work_dir / PID_FILE).unlink()
        for handle in (self._log, self._stderr_log):
            if handle is not None:
                handle.close()

    async def _outcome(self, exit_code: int) -> TrainerOutcome:
        tail = tuple(self.stderr_tail)
        if exit_code != 0:
            killed = exit_code < 0 and self.failed is None
            raise TrainerError(
                f"trainer for job {self.spec.job_id} exited with code {exit_code}"
                + (f": {self.failed.error}: {self.failed.detail}" if self.failed else "")
                + (f" (killed by {_signal_name(-exit_code)})" if killed else ""),
                data={
                    "job_id": self.spec.job_id,
                    "exit_code": exit_code,
                    # Killed from outside (the OOM killer, an operator): [training] retries
                    # runs it again from its last checkpoint.
                    **({"reason": "killed"} if killed else {}),
                    "error": self.failed.error if self.failed else None,
                    "stderr_tail": list(tail),
                },
            )
        if self.stopped is None:
            raise TrainerError(
                f"trainer for job {self.spec.job_id} exited 0 without a stopped event",
                data={"job_id": self.spec.job_id, "exit_code": 0, "stderr_tail": list(tail)},
            )
        manifest = None
        adapter_path = None
        if self.adapter_saved is not None:
            adapter_path = Path(self.adapter_saved.path)
            try:
                manifest = await anyio.to_thread.run_sync(verify_adapter, adapter_path)
            except ValidationError as exc:
                raise TrainerError(
                    f"the trainer's adapter does not verify: {exc}",
                    data={"job_id": self.spec.job_id, **exc.data},
                ) from exc
            if manifest.adapter_sha256 != self.adapter_saved.sha256:
                raise TrainerError(
                    "the adapter on disk is not the one the trainer reported",
                    data={"job_id": self.spec.job_id, "file": str(adapter_path)},
                )
        elif self.stopped.reason != "non_finite" and self.saves_adapter:
            raise TrainerError(
                f"trainer stopped ({self.stopped.reason}) without saving an adapter",
                data={"job_id": self.spec.job_id, "stderr_tail": list(tail)},
            )
        return TrainerOutcome(
            exit_code=exit_code,
            stopped=self.stopped,
            adapter=manifest,
            adapter_path=adapter_path,
            stderr_tail=tail,
            bad_lines=self.bad_lines,
        )


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


async def _receive(stream: ByteReceiveStream) -> bytes | None:
    """The next chunk, or None at the end of the stream (a closed stream counts as the end)."""
    try:
        return await stream.receive()
    except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
        return None


RETRYABLE = frozenset({"worker_died", "killed"})
"""TrainerError reasons ``[training] retries`` runs again: the trainer's process, Ray worker or
node died under it. A trainer that failed by itself (bad spec, an exception, no adapter) fails."""


async def retrying(spec: TrainJobSpec, retries: int,
                   attempt: Callable[[TrainJobSpec], Awaitable[TrainerOutcome]], *,
                   on_retry: Callable[[int, TrainerError], None] | None = None) -> TrainerOutcome:
    """``attempt(spec)``, then up to ``retries`` more times with ``resume = true`` (from the
    last checkpoint) while it dies of a :data:`RETRYABLE` cause; ``on_retry(n, error)`` hears
    each new attempt. The error that ends it carries ``attempts``. Whatever the attempts, the
    caller records the job's end once."""
    for number in range(1, retries + 2):
        try:
            return await attempt(spec if number == 1 else msgspec.structs.replace(spec, resume=True))
        except TrainerError as exc:
            exc.data["attempts"] = number
            if exc.data.get("reason") not in RETRYABLE or number > retries:
                raise
            log.warning("trainer died; running it again from its last checkpoint",
                        job_id=spec.job_id, attempt=number + 1, attempts=retries + 1,
                        reason=exc.data.get("reason"), error=str(exc))
            if on_retry is not None:
                on_retry(number + 1, exc)
    raise AssertionError("unreachable")  # pragma: no cover


async def run_trainer(
    spec: TrainJobSpec,
    *,
    on_event: TrainerEventHandler,
    log_path: Path,
    python: str = sys.executable,
    env: Mapping[str, str] | None = None,
    cancel_grace: float = 30.0,
    warm: WarmTrainer | None = None,
) -> TrainerOutcome:
    """Run one trainer child to its end; see :class:`TrainerProcess` and the module doc.

    With ``warm``, the job goes to its waiting child when there is one (else a cold start) and a
    new warm child is started when this one has ended.
    """
    trainer = TrainerProcess(
        spec=spec,
        on_event=on_event,
        log_path=Path(log_path),
        python=python,
        env=env,
        cancel_grace=cancel_grace,
        warm=warm,
    )
    return await trainer.run()
