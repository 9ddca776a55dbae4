"""systemd integration, each half checked on real sockets: sd_notify datagrams and socket activation."""

from __future__ import annotations

import socket
from pathlib import Path

from support.daemon_process import start_daemon


def test_ready_carries_status_and_the_daemons_own_mainpid(short_tmp: Path) -> None:
    with start_daemon(short_tmp / "home") as daemon:
        ready = daemon.wait_ready(timeout=1)
        assert ready["READY"] == "1"
        assert ready["STATUS"]
        assert int(ready["MAINPID"]) == daemon.pid
        assert not any(m.get("STOPPING") for m in daemon.notify.messages)


def test_status_messages_come_before_ready(short_tmp: Path) -> None:
    with start_daemon(short_tmp / "home") as daemon:
        messages = daemon.notify.messages
        ready_at = next(i for i, m in enumerate(messages) if m.get("READY") == "1")
        assert any("STATUS" in m for m in messages[:ready_at])


def test_watchdog_pings_arrive_repeatedly_when_watchdog_usec_is_set(short_tmp: Path) -> None:
    # WatchdogSec=0.2s: the daemon pings every half interval from its event loop.
    env = {"WATCHDOG_USEC": "200000"}
    with start_daemon(short_tmp / "home", env=env) as daemon:
        pings = daemon.wait_for_notify_count(lambda m: m.get("WATCHDOG") == "1", 3, timeout=10)
        assert len(pings) == 3


def test_watchdog_pings_arrive_when_watchdog_pid_names_the_daemon(short_tmp: Path) -> None:
    with start_daemon(short_tmp / "home", watchdog_usec=200_000) as daemon:
        environ = Path(f"/proc/{daemon.pid}/environ").read_bytes().split(b"\0")
        assert f"WATCHDOG_PID={daemon.pid}".encode() in environ
        daemon.wait_for_notify_count(lambda m: m.get("WATCHDOG") == "1", 3, timeout=10)


def test_sigterm_sends_stopping_after_ready(short_tmp: Path) -> None:
    with start_daemon(short_tmp / "home") as daemon:
        assert daemon.terminate() == 0
        stopping = daemon.wait_for_notify(lambda m: m.get("STOPPING") == "1", timeout=1)
        assert stopping["STATUS"]
        kinds = [next(iter(m)) for m in daemon.notify.messages if "READY" in m or "STOPPING" in m]
        assert kinds == ["READY", "STOPPING"]


def test_an_abstract_notify_socket_receives_ready_too(short_tmp: Path) -> None:
    with start_daemon(short_tmp / "home", abstract_notify=True) as daemon:
        assert daemon.notify.address.startswith("@")
        assert daemon.wait_ready(timeout=1)["READY"] == "1"


def test_socket_activation_serves_on_the_inherited_socket_and_leaves_its_file_alone(
    short_tmp: Path,
) -> None:
    socket_path = short_tmp / "activated" / "modelsmith.sock"
    socket_path.parent.mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))
    listener.listen(16)
    with start_daemon(short_tmp / "home", socket_path=socket_path, listen_socket=listener) as daemon:
        # Only the daemon's copy of the socket is left listening.
        listener.close()
        assert daemon.call("daemon.ping")["pong"] is True
        assert Path(daemon.call("daemon.status")["socket"]) == socket_path
        assert daemon.terminate() == 0
    # systemd owns an activated socket's file: the daemon must not unlink it.
    assert socket_path.exists()
