"""Socket activation by systemd's own activator: ``systemd-socket-activate -l PATH modelsmith daemon``.

systemd-socket-activate binds PATH, waits for the first connection, then execs the daemon in its
own process (same pid) with the listening socket as fd 3 and LISTEN_PID/LISTEN_FDS set, the way
PID 1 does for modelsmith.socket. It passes on only PATH, HOME, TERM and what ``-E`` names, so
NOTIFY_SOCKET travels with ``-E``. The daemon must report the socket it inherited (READY's
STATUS line, ``daemon.status``), never the one its own defaults would have chosen.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.daemon_process import NotifyListener, NotifyMessage, read_frame, send_message

from modelsmith.rpc.client import RpcClient

ACTIVATE = shutil.which("systemd-socket-activate")
pytestmark = pytest.mark.skipif(
    ACTIVATE is None, reason="systemd-socket-activate is not installed (make setup installs Debian's systemd)"
)

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0

# Between the test and the activator: SIGTERM when the test process dies (the parent-death
# signal survives exec, and the activator execs the daemon in the same process), then exec.
_PDEATHSIG_EXEC = """\
import ctypes, os, signal, sys
if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM) != 0:
    sys.exit("prctl(PR_SET_PDEATHSIG) failed")
if os.getppid() != int(sys.argv[1]):
    sys.exit("the test process is gone")
os.execv(sys.argv[2], sys.argv[2:])
"""

# What the test runner's environment must not hand the daemon: the daemon would resolve its
# socket from these, and this test is about the case where nothing names the inherited one.
_NOISE = ("MODELSMITH_SOCKET", "MODELSMITH_HOME", "XDG_RUNTIME_DIR", "NOTIFY_SOCKET", "LISTEN_PID",
          "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID")


def daemon_command() -> list[str]:
    """``modelsmith daemon`` from this venv (the console script), as the unit runs it."""
    script = Path(sys.executable).with_name("modelsmith")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script), "daemon"]
    return [sys.executable, "-m", "modelsmith.daemon"]


@dataclass
class Activated:
    process: subprocess.Popen[bytes]
    socket_path: Path
    notify: NotifyListener
    log_path: Path
    pidfd: int

    def log_tail(self) -> str:
        return "activator/daemon log (tail):\n" + self.log_path.read_text(errors="replace")[-4000:]

    def connect(self, timeout: float = 10.0) -> socket.socket:
        """Connect once the activator listens (the first connection is what starts the daemon)."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(str(self.socket_path))
                return sock
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if self.process.poll() is not None:
                    raise AssertionError(f"the activator exited {self.process.returncode}\n{self.log_tail()}") from None
                if time.monotonic() > deadline:
                    raise AssertionError(f"nothing listened at {self.socket_path} within {timeout} s\n{self.log_tail()}") from None
                time.sleep(0.01)

    def wait_ready(self) -> NotifyMessage:
        return self.notify.wait_for_count(
            lambda m: m.get("READY") == "1", 1, timeout=READY_TIMEOUT_S, abort_fd=self.pidfd, abort=self.log_tail
        )[0]

    def terminate(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            raise AssertionError(f"the daemon did not stop within {STOP_TIMEOUT_S} s\n{self.log_tail()}") from None


@contextlib.contextmanager
def socket_activated(
    scratch: Path, socket_path: Path, daemon_args: Sequence[str] = (), setenv: Sequence[str] = ()
) -> Iterator[Activated]:
    assert ACTIVATE is not None
    home = scratch / "home"
    home.mkdir()
    notify = NotifyListener(scratch / "notify.sock")
    env = {k: v for k, v in os.environ.items() if k not in _NOISE}
    activator = [
        ACTIVATE, "-l", str(socket_path),
        "-E", f"NOTIFY_SOCKET={notify.address}",
        "-E", "HF_HUB_OFFLINE=1",
        "-E", "PYTHONUNBUFFERED=1",
        *(arg for pair in (("-E", value) for value in setenv) for arg in pair),
        *daemon_command(), "--home", str(home), "--no-engines", *daemon_args,
    ]
    log_path = scratch / "daemon.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-c", _PDEATHSIG_EXEC, str(os.getpid()), *activator],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            env=env, cwd=scratch, start_new_session=True,
        )
    activated = Activated(process, socket_path, notify, log_path, os.pidfd_open(process.pid))
    try:
        yield activated
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        os.close(activated.pidfd)
        notify.close()


def call_on(sock: socket.socket, method: str, request_id: int = 1) -> Any:
    send_message(sock, {"jsonrpc": "2.0", "id": request_id, "method": method, "params": {}})
    reply = read_frame(sock)
    assert reply is not None and "result" in reply, reply
    return reply["result"]


def test_the_daemon_reports_the_socket_it_inherited_from_systemd_socket_activate(short_tmp: Path) -> None:
    socket_path = short_tmp / "activated" / "ms.sock"
    socket_path.parent.mkdir()
    with socket_activated(short_tmp, socket_path) as activated:
        # This connection waits in the backlog of systemd's socket and starts the daemon.
        with activated.connect() as first:
            ready = activated.wait_ready()
            assert int(ready["MAINPID"]) == activated.process.pid  # the activator exec'd the daemon
            assert ready["STATUS"].endswith(f"on {socket_path}"), ready
            assert f"/tmp/modelsmith-{os.getuid()}" not in ready["STATUS"]
            status = call_on(first, "daemon.status")
            assert status["socket"] == str(socket_path)
            assert status["pid"] == activated.process.pid
        with RpcClient(socket_path, timeout=10) as rpc:
            assert rpc.call("daemon.status", {})["socket"] == str(socket_path)
        assert activated.terminate() == 0, activated.log_tail()
    # systemd owns an activated socket's file: the daemon left it where it was.
    assert socket_path.exists()


def test_the_inherited_socket_wins_over_socket_and_modelsmith_socket(short_tmp: Path) -> None:
    socket_path = short_tmp / "activated" / "ms.sock"
    socket_path.parent.mkdir()
    configured = short_tmp / "configured" / "other.sock"
    env_named = short_tmp / "env" / "env.sock"
    with socket_activated(
        short_tmp, socket_path, ["--socket", str(configured)], setenv=[f"MODELSMITH_SOCKET={env_named}"]
    ) as activated:
        with activated.connect() as first:
            ready = activated.wait_ready()
            assert ready["STATUS"].endswith(f"on {socket_path}"), ready
            assert call_on(first, "daemon.status")["socket"] == str(socket_path)
        assert activated.terminate() == 0, activated.log_tail()
        log = activated.log_path.read_text(errors="replace")
    # Nothing was bound (nor a directory made) at the paths the daemon did not serve.
    assert not configured.parent.exists()
    assert not env_named.parent.exists()
    assert "socket passed by socket activation" in log
