"""Engine processes die with their daemon, also after kill -9, and a new daemon stops leftovers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from modelsmith.gpu.engine_reaper import OWNER_ENV, stop_leftover_engines

# A stand-in daemon: marks its children, starts the watcher, starts a multiprocessing (spawn)
# child as vLLM does for its engine core, prints the child's pid and waits to be killed.
DAEMON = textwrap.dedent("""
    import multiprocessing, sys, time
    from pathlib import Path
    from modelsmith.gpu import engine_reaper

    def engine_core():
        time.sleep(600)

    if __name__ == "__main__":
        home = Path(sys.argv[1])
        engine_reaper.mark_children(home)
        watch = sys.argv[2] == "watch"
        if watch:
            engine_reaper.start_watcher(home)
        child = multiprocessing.get_context("spawn").Process(target=engine_core, daemon=False)
        child.start()
        print(child.pid, flush=True)
        time.sleep(600)
""")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[str], int]:
    script = tmp_path / "fake_daemon.py"
    script.write_text(DAEMON)
    env = {k: v for k, v in os.environ.items() if k != OWNER_ENV}
    daemon = subprocess.Popen([sys.executable, str(script), str(tmp_path / "home"), mode],
                              stdout=subprocess.PIPE, text=True, env=env)
    assert daemon.stdout is not None
    engine_pid = int(daemon.stdout.readline())
    assert _alive(engine_pid)
    return daemon, engine_pid


def _wait_gone(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_the_engine_process_dies_when_its_daemon_is_killed_with_sigkill(tmp_path: Path) -> None:
    daemon, engine_pid = _start(tmp_path, "watch")
    try:
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.wait(timeout=10)
        assert _wait_gone(engine_pid), "the engine core outlived its daemon"
    finally:
        if _alive(engine_pid):
            os.kill(engine_pid, signal.SIGKILL)


def test_a_starting_daemon_stops_a_leftover_engine_of_its_home_only(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    daemon, engine_pid = _start(tmp_path, "no-watch")
    try:
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.wait(timeout=10)
        assert _alive(engine_pid)  # without the watcher it would stay (re-parented)
        assert stop_leftover_engines(tmp_path / "other") == []
        assert _alive(engine_pid)

        # (with the resource tracker multiprocessing leaves beside it)
        assert engine_pid in stop_leftover_engines(tmp_path / "home")
        assert _wait_gone(engine_pid, timeout=5)
    finally:
        if _alive(engine_pid):
            os.kill(engine_pid, signal.SIGKILL)
