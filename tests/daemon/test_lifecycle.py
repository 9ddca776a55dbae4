"""The daemon's socket and lifetime: file modes, SIGTERM with clients connected, one daemon per socket."""

from __future__ import annotations

import os
import signal
import socket
import stat
from pathlib import Path

import anyio
import pytest
from support.daemon_process import (
    raw_connect,
    spawn_daemon,
    start_daemon,
    wait_closed,
)

from modelsmith.errors import DaemonUnreachable
from modelsmith.rpc.client import connect


def test_the_socket_is_0660_inside_a_0750_directory(short_tmp: Path) -> None:
    socket_path = short_tmp / "run" / "ms.sock"
    with start_daemon(short_tmp / "home", socket_path=socket_path):
        mode = socket_path.stat().st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o660
        assert stat.S_IMODE(socket_path.parent.stat().st_mode) == 0o750


def test_a_socket_in_an_existing_shared_directory_leaves_that_directorys_mode_alone(
    short_tmp: Path,
) -> None:
    shared = short_tmp / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp
    socket_path = shared / "ms.sock"
    with start_daemon(short_tmp / "home", socket_path=socket_path):
        assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o660


def test_sigterm_with_clients_connected_exits_0_removes_the_socket_and_closes_every_client(
    short_tmp: Path,
) -> None:
    socket_path = short_tmp / "run" / "ms.sock"
    with start_daemon(short_tmp / "home", socket_path=socket_path) as daemon:
        busy = [daemon.client() for _ in range(4)]
        for rpc in busy:
            rpc.connect()
            assert rpc.call("daemon.ping")["pong"] is True
        silent = raw_connect(socket_path)  # connected, never sent a byte
        try:
            assert daemon.terminate(timeout=15) == 0
            assert wait_closed(silent, timeout=5) == b""
            for rpc in busy:
                with pytest.raises(DaemonUnreachable):
                    rpc.call("daemon.ping")
        finally:
            silent.close()
            for rpc in busy:
                rpc.close()
        assert not socket_path.exists()
        stopping = daemon.wait_for_notify(lambda m: m.get("STOPPING") == "1", timeout=1)
        assert stopping["STATUS"]


async def test_sigterm_fails_the_calls_of_a_connected_async_client_with_daemon_unreachable(
    short_tmp: Path,
) -> None:
    with start_daemon(short_tmp / "home") as daemon:
        with anyio.fail_after(20):
            async with connect(daemon.socket_path) as rpc:
                assert (await rpc.call("daemon.ping"))["pong"] is True
                assert await anyio.to_thread.run_sync(daemon.terminate) == 0
                with pytest.raises(DaemonUnreachable):
                    await rpc.call("daemon.ping")


def test_a_second_daemon_on_a_live_socket_is_refused_and_the_first_keeps_serving(
    short_tmp: Path,
) -> None:
    socket_path = short_tmp / "run" / "ms.sock"
    with start_daemon(short_tmp / "home", socket_path=socket_path) as first:
        with spawn_daemon(short_tmp / "home2", socket_path=socket_path) as second:
            code = second.wait_exit(timeout=20)
            assert code != 0
            assert not [m for m in second.notify.messages if m.get("READY") == "1"]
        assert socket_path.exists()
        assert first.call("daemon.ping")["pong"] is True
        assert first.call("daemon.status")["pid"] == first.pid


def test_a_stale_socket_file_is_replaced(short_tmp: Path) -> None:
    socket_path = short_tmp / "run" / "ms.sock"
    socket_path.parent.mkdir(parents=True)
    # A socket file nobody listens on: what a crashed daemon leaves behind.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(socket_path))
    stale.close()
    assert socket_path.exists()
    with start_daemon(short_tmp / "home", socket_path=socket_path) as daemon:
        assert daemon.call("daemon.ping")["pong"] is True
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o660


def test_a_bad_daemon_config_stops_the_start_with_exit_code_2(short_tmp: Path) -> None:
    with spawn_daemon(short_tmp / "home", config_toml="read_timeout_s = -1\n") as daemon:
        assert daemon.wait_exit(timeout=20) == 2


def test_sigint_stops_the_daemon_cleanly_too(short_tmp: Path) -> None:
    with start_daemon(short_tmp / "home") as daemon:
        daemon.process.send_signal(signal.SIGINT)
        assert daemon.wait_exit(timeout=15) == 0
        assert not daemon.socket_path.exists()
