"""Hostile input at the daemon's socket: after each, the real daemon process still answers ping.

Classes: frames nested far past the limit (issue 12.1), more connections than descriptors or
caps (12.2), and ``--socket`` aimed at a file that is not a socket (12.6).
"""

from __future__ import annotations

import contextlib
import errno
import json
import resource
import selectors
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.daemon_process import (
    DaemonProcess,
    raw_connect,
    read_frame,
    send_frame,
    short_tmp_dir,
    spawn_daemon,
    start_daemon,
    write_cluster,
)

from modelsmith.rpc.admission import fd_reserve
from modelsmith.rpc.inbound import MAX_NESTING_DEPTH

WAIT_S = 20.0


@contextlib.contextmanager
def daemon_on_fresh_home(config_toml: str | None = None) -> Iterator[DaemonProcess]:
    with short_tmp_dir() as base:
        home = base / "home"
        write_cluster(home, "adtech")
        with start_daemon(home, socket_path=base / "run" / "ms.sock", config_toml=config_toml) as daemon:
            yield daemon


def assert_still_serving(daemon: DaemonProcess) -> None:
    assert daemon.returncode is None, daemon.log_text()[-4000:]
    assert daemon.call("daemon.ping")["pong"] is True


def exchange(daemon: DaemonProcess, payload: bytes) -> Any:
    with raw_connect(daemon.socket_path) as sock:
        send_frame(sock, payload)
        reply = read_frame(sock)
    assert reply is not None, "the daemon closed the connection instead of answering"
    return reply


# -- nesting -----------------------------------------------------------------------------------


def deep(levels: int, *, with_id: bool = True) -> bytes:
    head = '{"jsonrpc": "2.0", ' + ('"id": 1, ' if with_id else "") + '"method": "daemon.ping", "params": {"a": '
    return (head + "[" * levels + "]" * levels + "}}").encode()


def test_a_2kb_request_nested_1000_levels_gets_a_typed_error_and_the_daemon_keeps_serving() -> None:
    with daemon_on_fresh_home() as daemon:
        payload = deep(1000)
        assert len(payload) < 2200
        reply = exchange(daemon, payload)
        assert reply["jsonrpc"] == "2.0"
        assert reply["error"]["code"] == -32600
        assert reply["error"]["data"] == {"name": "invalid_request", "reason": "too_deep", "limit": MAX_NESTING_DEPTH}
        # The same as a notification, inside a batch, and far deeper: each answered, none fatal.
        for hostile in (deep(1000, with_id=False), b"[" + deep(5000) + b"]", b"[" * 100_000):
            assert exchange(daemon, hostile)["error"]["code"] == -32600
        assert_still_serving(daemon)


def test_a_request_at_the_nesting_limit_is_served() -> None:
    with daemon_on_fresh_home() as daemon:
        # The envelope and params objects take two levels of the limit.
        reply = exchange(daemon, deep(MAX_NESTING_DEPTH - 2))
        assert reply["result"]["pong"] is True


# -- connections -------------------------------------------------------------------------------


@contextlib.contextmanager
def open_connections(path: Path, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connected sockets (each connect bounded); all closed afterwards."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(sock)
            # A blocking connect waits for room in a full backlog; SO_SNDTIMEO bounds that wait.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(WAIT_S), 0))
            sock.connect(str(path))
            sock.settimeout(WAIT_S)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def wait_refusals(socks: list[socket.socket], expected: int) -> tuple[list[dict[str, Any]], list[socket.socket]]:
    """Wait (bounded) until ``expected`` sockets got their refusal frame and were closed;
    returns the refusals and the sockets that got nothing (the admitted ones)."""
    refusals: list[dict[str, Any]] = []
    pending = set(socks)
    deadline = time.monotonic() + WAIT_S
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        while len(refusals) < expected:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{len(refusals)} of {expected} refusals within {WAIT_S} s"
            for key, _ in selector.select(remaining):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                selector.unregister(sock)
                pending.discard(sock)
                message = read_frame(sock)
                assert message is not None, "a refused connection must get its error frame first"
                assert sock.recv(1) == b"", "a refused connection must be closed"
                refusals.append(message)
    return refusals, [s for s in socks if s in pending]


def ping_on(sock: socket.socket, request_id: int) -> dict[str, Any] | None:
    send_frame(sock, json.dumps({"jsonrpc": "2.0", "id": request_id, "method": "daemon.ping"}).encode())
    return read_frame(sock)


@contextlib.contextmanager
def nofile_limit_for_children(soft: int) -> Iterator[None]:
    """Children started inside inherit ``RLIMIT_NOFILE`` = ``soft``; ours is restored after."""
    old_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (old_soft, hard))


def test_400_connections_under_a_256_descriptor_limit_are_capped_with_a_typed_refusal() -> None:
    soft = 256
    cap = soft - fd_reserve(soft)
    with short_tmp_dir() as base:
        home = base / "home"
        write_cluster(home, "adtech")
        with nofile_limit_for_children(soft):
            started = start_daemon(home, socket_path=base / "run" / "ms.sock")
            daemon = started.__enter__()
        try:
            with open_connections(daemon.socket_path, 400) as socks:
                refusals, admitted = wait_refusals(socks, 400 - cap)
                assert daemon.returncode is None
                assert len(admitted) == cap
                for refusal in refusals:
                    assert refusal["jsonrpc"] == "2.0" and refusal["id"] is None
                    assert refusal["error"]["code"] == 1011
                    assert refusal["error"]["data"]["reason"] == "too_many_connections"
                    assert refusal["error"]["data"]["scope"] == "total"
                    assert refusal["error"]["data"]["limit"] == cap
                # The admitted ones are served, and over the cap nobody else gets in.
                assert ping_on(admitted[0], 1)["result"]["pong"] is True  # type: ignore[index]
                assert ping_on(admitted[-1], 2)["result"]["pong"] is True  # type: ignore[index]
            assert_still_serving(daemon)
        finally:
            started.__exit__(None, None, None)


def test_one_uid_over_its_cap_is_refused_naming_the_per_uid_limit() -> None:
    with daemon_on_fresh_home("max_connections_per_uid = 5\n") as daemon:
        with open_connections(daemon.socket_path, 8) as socks:
            refusals, admitted = wait_refusals(socks, 3)
            assert len(admitted) == 5
            assert {r["error"]["data"]["scope"] for r in refusals} == {"uid"}
            assert {r["error"]["data"]["limit"] for r in refusals} == {5}
            assert {r["error"]["data"]["setting"] for r in refusals} == {"max_connections_per_uid"}
        # Closed connections give their places back.
        with open_connections(daemon.socket_path, 5) as socks:
            assert [ping_on(s, n)["result"]["pong"] for n, s in enumerate(socks)] == [True] * 5  # type: ignore[index]


def test_accept_running_out_of_descriptors_backs_off_and_the_daemon_recovers() -> None:
    with daemon_on_fresh_home() as daemon:
        # The cap was sized for the limit at start; now far fewer descriptors exist: EMFILE.
        _soft, hard = resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (64, hard))
        socks: list[socket.socket] = []
        try:
            for _ in range(400):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.setblocking(False)
                socks.append(sock)
                # A full backlog answers EAGAIN: that client is simply not queued.
                assert sock.connect_ex(str(daemon.socket_path)) in (0, errno.EAGAIN)
            deadline = time.monotonic() + WAIT_S
            while "accept failed" not in daemon.log_text():
                assert time.monotonic() < deadline, "accept never ran out of descriptors"
                assert daemon.returncode is None, daemon.log_text()[-4000:]
                time.sleep(0.05)
            assert daemon.returncode is None
        finally:
            for sock in socks:
                sock.close()
        resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (1024, hard))
        assert_still_serving(daemon)
        log = daemon.log_text()
        assert 1 <= log.count("accept failed") <= 5, "one log line per burst, not per attempt"


# -- --socket at something that is not a socket -------------------------------------------------


@pytest.mark.parametrize("kind", ["regular-file", "ledger", "symlink"])
def test_socket_pointing_at_an_existing_file_leaves_it_byte_identical_and_the_daemon_exits(kind: str) -> None:
    with short_tmp_dir() as base:
        home = base / "home"
        cluster = write_cluster(home, "adtech")
        if kind == "ledger":
            target = cluster / "ledger.jsonl"
            target.write_bytes(b'{"not": "touched"}\n')
            victim = target
        else:
            victim = base / "precious.txt"
            victim.write_bytes(b"precious bytes\n" * 100)
            target = victim
            if kind == "symlink":
                target = base / "link.sock"
                target.symlink_to(victim)
        before = victim.read_bytes()
        before_stat = victim.stat()
        with spawn_daemon(home, socket_path=target) as daemon:
            code = daemon.wait_exit(WAIT_S)
            log = daemon.log_text()
        assert code != 0
        assert "not a socket" in log and str(target) in log
        assert victim.read_bytes() == before
        assert victim.stat().st_ino == before_stat.st_ino
        assert victim.stat().st_mtime_ns == before_stat.st_mtime_ns
        assert target.exists() or target.is_symlink()


def test_a_stale_socket_file_nobody_accepts_on_is_still_replaced() -> None:
    with short_tmp_dir() as base:
        home = base / "home"
        write_cluster(home, "adtech")
        path = base / "run" / "ms.sock"
        path.parent.mkdir()
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(path))
        stale.close()  # the file stays, nobody listens: connect() is refused
        with start_daemon(home, socket_path=path) as daemon:
            assert_still_serving(daemon)
