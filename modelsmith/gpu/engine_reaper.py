"""Engine processes die with their daemon: vLLM's engine core never outlives ``kill -9``.

vLLM starts its engine core as a child process (multiprocessing, spawn) that nothing of ours can
give a parent-death signal. So every process the daemon starts inherits a marker in its
environment (``MODELSMITH_ENGINE_OWNER=<home>``), and:

- at start, the daemon stops every marked process of its own home that is still running
  (:func:`stop_leftover_engines`: SIGTERM, then SIGKILL after a bound) — the engine of a daemon
  that was killed, still holding device memory;
- while it runs, a small watcher (``python -m modelsmith.gpu.engine_reaper HOME``, its own
  session) holds the read end of a pipe whose write end only the daemon has: when the daemon
  dies for any reason the pipe reads EOF and the watcher stops the marked processes.

Trainer children carry the marker too but are left alone: a leftover trainer is stopped by the
crash recovery (SIGTERM so that it checkpoints), never killed here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["OWNER_ENV", "mark_children", "start_watcher", "stop_leftover_engines"]

OWNER_ENV = "MODELSMITH_ENGINE_OWNER"
_TRAINER_MODULE = b"modelsmith.gpu.trainer"


def mark_children(home: Path) -> None:
    """Make every process started from now on carry this daemon's marker."""
    os.environ[OWNER_ENV] = str(Path(home).resolve())


def _marked(home: str) -> list[int]:
    wanted = f"{OWNER_ENV}={home}".encode()
    me = os.getpid()
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        # vLLM's helpers are multiprocessing children (the engine core renames itself VLLM::...);
        # daemons, trainers and this watcher are never matched.
        engine_like = cmdline.startswith(b"VLLM") or b"multiprocessing" in cmdline
        if wanted in environ and engine_like and _TRAINER_MODULE not in cmdline:
            found.append(int(entry.name))
    return found


def stop_leftover_engines(home: Path, *, grace_s: float = 10.0) -> list[int]:
    """Stop every marked engine process of ``home`` (not this one). Returns their pids."""
    pids = _marked(str(Path(home).resolve()))
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in alive if Path(f"/proc/{pid}").exists() and not _zombie(pid)]
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def start_watcher(home: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start the watcher; returns it and the pipe's write end (keep it open while running)."""
    read_end, write_end = os.pipe()
    os.set_inheritable(read_end, True)
    env = {k: v for k, v in os.environ.items() if k != OWNER_ENV}
    watcher = subprocess.Popen(
        [sys.executable, "-m", "modelsmith.gpu.engine_reaper", str(Path(home).resolve()),
         str(read_end)],
        pass_fds=(read_end,), start_new_session=True, env=env,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    os.close(read_end)
    return watcher, write_end


def _watch(home: str, fd: int) -> None:
    while os.read(fd, 1024):  # only EOF (the daemon is gone) ends the wait
        pass
    stop_leftover_engines(Path(home))


if __name__ == "__main__":
    _watch(sys.argv[1], int(sys.argv[2]))
