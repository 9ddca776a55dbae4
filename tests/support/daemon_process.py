"""Run the Modelsmith daemon as a real subprocess on a temporary home, the way systemd runs it.

The daemon is ``python -m modelsmith.daemon --home H --socket S [--no-engines]`` with
``NOTIFY_SOCKET`` pointing at a datagram socket bound here. Readiness is the daemon's own
``READY=1`` on that socket: no sleeps and no polling of the RPC socket. Every wait is bounded,
and a daemon that dies early fails the wait at once (a pidfd of the child wakes it)::

    with start_daemon(home) as daemon:
        assert daemon.call("daemon.ping")["pong"]
        daemon.notify.messages          # every NOTIFY_SOCKET message so far, parsed
        daemon.terminate()              # SIGTERM; returns the exit code within a bound

Leaving a :func:`start_daemon` block stops a daemon that still runs with SIGTERM and asserts
that it exits 0 in time. :func:`spawn_daemon` is the lower level: it does not wait for
readiness and does not judge the exit code (for daemons that are expected to fail).

The module also holds the byte-level wire helpers the protocol tests need (``send_frame``,
``read_frame``, ``wait_closed``) and writers for cluster directories.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelsmith.rpc.client import RpcClient

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
_HEADER = struct.Struct(">I")

# Variables of the test runner's own environment that would confuse a child daemon.
_INHERITED_NOISE = (
    "NOTIFY_SOCKET",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "MODELSMITH_SOCKET",
    "MODELSMITH_HOME",
)

# Runs between the test and the daemon, then execs the daemon (same pid):
# - it asks the kernel for SIGTERM when the test process dies (PR_SET_PDEATHSIG), so a killed
#   test run never leaves a daemon behind;
# - it does what systemd does between fork and exec: the listening socket becomes fd 3 and
#   LISTEN_PID names the process (a pid survives exec, so the daemon sees itself named); with
#   a watchdog, WATCHDOG_PID names it too.
# argv: <test pid> <listen fd or "-"> <"watchdog-pid" or "-"> <python args of the daemon...>
_EXEC_WRAPPER = """\
import ctypes, os, signal, sys
PR_SET_PDEATHSIG = 1
if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
    sys.exit("prctl(PR_SET_PDEATHSIG) failed")
if os.getppid() != int(sys.argv[1]):
    sys.exit("the test process is gone")
if sys.argv[2] != "-":
    fd = int(sys.argv[2])
    if fd != 3:
        os.dup2(fd, 3)
        os.close(fd)
    os.set_inheritable(3, True)
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ["LISTEN_FDS"] = "1"
    os.environ["LISTEN_FDNAMES"] = "modelsmith.socket"
if sys.argv[3] == "watchdog-pid":
    os.environ["WATCHDOG_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, *sys.argv[4:]])
"""

NotifyMessage = dict[str, str]


class DaemonExited(AssertionError):
    """The daemon exited while a test was waiting for something from it."""


class WaitTimedOut(AssertionError):
    """A bounded wait on the daemon ran out."""


def short_tmp_root() -> Path:
    """A directory whose paths stay far below the 107-byte limit of a Unix socket path."""
    return Path("/tmp") if Path("/tmp").is_dir() else Path(tempfile.gettempdir())


@contextlib.contextmanager
def short_tmp_dir(prefix: str = "ms-") -> Iterator[Path]:
    """A fresh directory under :func:`short_tmp_root`, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=short_tmp_root()))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- systemd notify ----------------------------------------------------------------------------


def parse_notify(datagram: bytes) -> NotifyMessage:
    """``b"READY=1\\nSTATUS=x"`` -> ``{"READY": "1", "STATUS": "x"}``."""
    fields: NotifyMessage = {}
    for line in datagram.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value
    return fields


class NotifyListener:
    """The datagram socket a child's ``NOTIFY_SOCKET`` points at; collects every message."""

    def __init__(self, path: Path | None = None, *, abstract_name: str | None = None) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        if abstract_name is not None:
            self._sock.bind("\0" + abstract_name)
            self.address = "@" + abstract_name
        elif path is not None:
            self._sock.bind(str(path))
            self.address = str(path)
        else:
            raise TypeError("NotifyListener needs a path or an abstract name")
        self._sock.setblocking(False)
        self.messages: list[NotifyMessage] = []

    def drain(self) -> list[NotifyMessage]:
        """Collect what has arrived, without blocking; returns only the new messages."""
        new: list[NotifyMessage] = []
        while True:
            try:
                datagram = self._sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            new.append(parse_notify(datagram))
        self.messages.extend(new)
        return new

    def wait_for_count(
        self,
        predicate: Callable[[NotifyMessage], bool],
        count: int,
        *,
        timeout: float,
        abort_fd: int | None = None,
        abort: Callable[[], str] | None = None,
    ) -> list[NotifyMessage]:
        """Wait until ``count`` messages satisfy ``predicate``; bounded by ``timeout``.

        When ``abort_fd`` becomes readable (a child's pidfd: the child exited) the wait fails at
        once with :class:`DaemonExited`, whose text comes from ``abort()``.
        """
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self._sock, selectors.EVENT_READ)
            if abort_fd is not None:
                selector.register(abort_fd, selectors.EVENT_READ)
            while True:
                self.drain()
                matches = [m for m in self.messages if predicate(m)]
                if len(matches) >= count:
                    return matches[:count]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WaitTimedOut(
                        f"{len(matches)} of {count} expected notify messages within {timeout} s; "
                        f"got {self.messages}" + (f"\n{abort()}" if abort else "")
                    )
                for key, _events in selector.select(remaining):
                    if key.fd == abort_fd:
                        self.drain()
                        if len([m for m in self.messages if predicate(m)]) >= count:
                            break
                        raise DaemonExited(
                            f"the daemon exited before sending the expected notify message; "
                            f"got {self.messages}" + (f"\n{abort()}" if abort else "")
                        )

    def close(self) -> None:
        self._sock.close()


# -- the daemon process ----------------------------------------------------------------------


@dataclass(eq=False)
class DaemonProcess:
    """A running (or finished) daemon child and what the test can observe of it."""

    home: Path
    socket_path: Path
    process: subprocess.Popen[bytes]
    notify: NotifyListener
    log_path: Path
    _pidfd: int = field(repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def log_text(self) -> str:
        """Everything the daemon wrote to stdout and stderr so far (its structured log)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def _log_tail(self) -> str:
        return "daemon log (tail):\n" + self.log_text()[-4000:]

    # -- notify ---------------------------------------------------------------------------
    def wait_for_notify(
        self, predicate: Callable[[NotifyMessage], bool], *, timeout: float = READY_TIMEOUT_S
    ) -> NotifyMessage:
        """The first NOTIFY_SOCKET message (already received or arriving) that matches."""
        return self.wait_for_notify_count(predicate, 1, timeout=timeout)[0]

    def wait_for_notify_count(
        self, predicate: Callable[[NotifyMessage], bool], count: int, *, timeout: float
    ) -> list[NotifyMessage]:
        return self.notify.wait_for_count(
            predicate, count, timeout=timeout, abort_fd=self._pidfd, abort=self._log_tail
        )

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> NotifyMessage:
        """Block until the daemon sent ``READY=1``; returns that message."""
        return self.wait_for_notify(lambda m: m.get("READY") == "1", timeout=timeout)

    # -- talking to it --------------------------------------------------------------------
    def client(self, *, timeout: float = 10.0) -> RpcClient:
        """A blocking client on the daemon's socket (use it as a context manager)."""
        return RpcClient(self.socket_path, timeout=timeout)

    def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        """One call on a fresh connection; returns the decoded result (raises typed errors)."""
        with self.client() as rpc:
            return rpc.call(method, dict(params or {}))

    # -- stopping it ----------------------------------------------------------------------
    def wait_exit(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """Wait for the process to exit; kills it and fails when that takes over ``timeout``."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            raise WaitTimedOut(
                f"the daemon (pid {self.pid}) did not exit within {timeout} s\n{self._log_tail()}"
            ) from None

    def terminate(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, then a bounded wait; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def _reap(self, timeout: float) -> None:
        if self.process.poll() is not None:
            return
        with contextlib.suppress(WaitTimedOut):
            self.terminate(timeout)

    def _close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._pidfd)
        self.notify.close()


def _child_env(notify_address: str, extra: Mapping[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _INHERITED_NOISE}
    env.update({
        "NOTIFY_SOCKET": notify_address,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra or {})
    return env


def wait_job(daemon: DaemonProcess, job_id: str, *, timeout_s: float = 120.0) -> dict[str, Any]:
    """Poll ``job.get`` until the job ends (succeeded, failed, cancelled); returns the job.
    A job still running after ``timeout_s`` fails the test."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = daemon.call("job.get", {"job_id": job_id})
        job = job.get("job", job)
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return dict(job)
        assert time.monotonic() < deadline, f"job {job_id} did not end within {timeout_s:g} s"
        time.sleep(0.05)  # polling another process, bounded by the deadline


@contextlib.contextmanager
def spawn_daemon(
    home: Path,
    *,
    socket_path: Path | None = None,
    no_engines: bool = True,
    config_toml: str | None = None,
    env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    listen_socket: socket.socket | None = None,
    watchdog_usec: int | None = None,
    abstract_notify: bool = False,
    stop_timeout: float = STOP_TIMEOUT_S,
) -> Iterator[DaemonProcess]:
    """Start the daemon without waiting for readiness; a live one is stopped on exit.

    ``config_toml`` is written to ``<home>/modelsmith.toml``. ``listen_socket`` (a bound,
    listening Unix socket) is handed over as fd 3 with ``LISTEN_PID``/``LISTEN_FDS`` set, as
    systemd's socket activation does. ``watchdog_usec`` turns the watchdog on the way systemd
    does (``WATCHDOG_USEC`` plus ``WATCHDOG_PID`` naming the daemon). ``abstract_notify`` binds the notify socket in the
    abstract namespace (``NOTIFY_SOCKET=@name``) instead of at a path.
    """
    home.mkdir(parents=True, exist_ok=True)
    if config_toml is not None:
        (home / "modelsmith.toml").write_text(config_toml, encoding="utf-8")
    with short_tmp_dir("msd-") as scratch:
        if abstract_notify:
            notify = NotifyListener(abstract_name=f"modelsmith-test-{os.getpid()}-{scratch.name}")
        else:
            notify = NotifyListener(scratch / "notify.sock")
        socket_path = socket_path or scratch / "run" / "modelsmith.sock"
        daemon_args = ["-m", "modelsmith.daemon", "--home", str(home), "--socket", str(socket_path)]
        if no_engines:
            daemon_args.append("--no-engines")
        daemon_args += list(extra_args)
        pass_fds: tuple[int, ...] = ()
        child_env = _child_env(notify.address, env)
        if watchdog_usec is not None:
            child_env["WATCHDOG_USEC"] = str(watchdog_usec)
        fd = "-"
        if listen_socket is not None:
            pass_fds = (listen_socket.fileno(),)
            fd = str(listen_socket.fileno())
        watchdog_pid = "-" if watchdog_usec is None else "watchdog-pid"
        command = [sys.executable, "-c", _EXEC_WRAPPER, str(os.getpid()), fd, watchdog_pid, *daemon_args]
        log_path = scratch / "daemon.log"
        try:
            with log_path.open("wb") as log_file:
                process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=child_env,
                    cwd=scratch,
                    pass_fds=pass_fds,
                    start_new_session=True,  # a terminal's Ctrl-C reaches the test, not the daemon
                )
        except BaseException:
            notify.close()
            raise
        daemon = DaemonProcess(
            home=home,
            socket_path=socket_path,
            process=process,
            notify=notify,
            log_path=log_path,
            _pidfd=os.pidfd_open(process.pid),
        )
        try:
            yield daemon
        finally:
            daemon._reap(stop_timeout)
            daemon._close()


@contextlib.contextmanager
def start_daemon(
    home: Path,
    *,
    socket_path: Path | None = None,
    no_engines: bool = True,
    config_toml: str | None = None,
    env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    listen_socket: socket.socket | None = None,
    watchdog_usec: int | None = None,
    abstract_notify: bool = False,
    ready_timeout: float = READY_TIMEOUT_S,
    stop_timeout: float = STOP_TIMEOUT_S,
) -> Iterator[DaemonProcess]:
    """Start the daemon, wait for ``READY=1``, and on exit require a clean SIGTERM stop (rc 0).

    Arguments as :func:`spawn_daemon`. A test may stop the daemon itself inside the block
    (:meth:`DaemonProcess.terminate`); then the exit code is the test's to judge.
    """
    with spawn_daemon(
        home,
        socket_path=socket_path,
        no_engines=no_engines,
        config_toml=config_toml,
        env=env,
        extra_args=extra_args,
        listen_socket=listen_socket,
        watchdog_usec=watchdog_usec,
        abstract_notify=abstract_notify,
        stop_timeout=stop_timeout,
    ) as daemon:
        daemon.wait_ready(ready_timeout)
        yield daemon
        if daemon.returncode is None:
            code = daemon.terminate(stop_timeout)
            if code != 0:
                raise AssertionError(f"the daemon exited {code} on SIGTERM\n{daemon._log_tail()}")


# -- clusters on a test home -------------------------------------------------------------------

GOOD_CLUSTER_TOML = """\
domain = "adtech"

[model]
base = "models/tiny-llama"
display_name = "tiny-llama"

[thresholds]
composite = 0.8
held_out = 0.75
"""

# thresholds.composite must lie in [0, 1]: the daemon reports this file and field.
BAD_CLUSTER_TOML = """\
[model]
base = "models/tiny-llama"

[thresholds]
composite = 1.5
"""


def write_cluster(home: Path, name: str, cluster_toml: str = GOOD_CLUSTER_TOML) -> Path:
    """Create ``<home>/<name>/cluster.toml``; returns the cluster directory."""
    root = home / name
    root.mkdir(parents=True, exist_ok=True)
    (root / "cluster.toml").write_text(cluster_toml, encoding="utf-8")
    return root


# -- byte-level wire helpers -------------------------------------------------------------------


def raw_connect(path: Path, *, timeout: float = 10.0) -> socket.socket:
    """A plain connected Unix stream socket; every recv on it is bounded by ``timeout``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(str(path))
    return sock


def send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(_HEADER.pack(len(payload)) + payload)


def send_message(sock: socket.socket, message: Mapping[str, Any]) -> None:
    send_frame(sock, json.dumps(message).encode())


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def read_frame(sock: socket.socket) -> dict[str, Any] | None:
    """The next message as a dict, or None when the daemon closed the connection."""
    header = _recv_exactly(sock, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    body = _recv_exactly(sock, size)
    if body is None:
        return None
    message: dict[str, Any] = json.loads(body)
    return message


def wait_closed(sock: socket.socket, *, timeout: float) -> bytes:
    """Read until the peer closes; returns what arrived before. Fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    received = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WaitTimedOut(f"the connection was still open after {timeout} s")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise WaitTimedOut(f"the connection was still open after {timeout} s") from None
        except ConnectionResetError:
            return bytes(received)
        if not chunk:
            return bytes(received)
        received += chunk
