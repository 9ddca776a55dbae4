"""Bad input over a raw socket: each gets a typed error (or a clean close) and the daemon stays up."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest
from support.daemon_process import (
    DaemonProcess,
    raw_connect,
    read_frame,
    send_frame,
    send_message,
    short_tmp_dir,
    start_daemon,
    wait_closed,
    write_cluster,
)

READ_TIMEOUT_S = 0.3
IDLE_TIMEOUT_S = 1.5
CONFIG = f"""\
read_timeout_s = {READ_TIMEOUT_S}
idle_timeout_s = {IDLE_TIMEOUT_S}
"""


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    with short_tmp_dir() as base:
        home = base / "home"
        write_cluster(home, "adtech")
        with start_daemon(home, socket_path=base / "run" / "ms.sock", config_toml=CONFIG) as process:
            yield process


@pytest.fixture(autouse=True)
def daemon_still_serves_afterwards(daemon: DaemonProcess) -> Iterator[None]:
    yield
    assert daemon.returncode is None, daemon.log_text()
    assert daemon.call("daemon.ping")["pong"] is True


def exchange(daemon: DaemonProcess, payload: bytes) -> dict[str, Any]:
    """Send one frame on a fresh connection and return the reply (which must come)."""
    with raw_connect(daemon.socket_path) as sock:
        send_frame(sock, payload)
        reply = read_frame(sock)
    assert reply is not None, "the daemon closed the connection instead of answering"
    assert_no_traceback(reply)
    return reply


def assert_no_traceback(reply: dict[str, Any]) -> None:
    assert "Traceback" not in json.dumps(reply)


def request(method: str, params: Any = None, request_id: int = 7) -> bytes:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params is not None:
        message["params"] = params
    return json.dumps(message).encode()


def test_an_unknown_method_gets_method_not_found_with_its_id(daemon: DaemonProcess) -> None:
    reply = exchange(daemon, request("daemon.nonsense"))
    assert reply["id"] == 7
    assert reply["error"]["code"] == -32601
    assert reply["error"]["data"]["name"] == "method_not_found"


def test_a_frame_that_is_not_json_gets_a_parse_error(daemon: DaemonProcess) -> None:
    reply = exchange(daemon, b'{"jsonrpc": "2.0", "method": ')
    assert reply["id"] is None
    assert reply["error"]["code"] == -32700


def test_an_array_of_non_requests_is_a_batch_with_one_invalid_request_each(
    daemon: DaemonProcess,
) -> None:
    reply: Any = exchange(daemon, b"[1, 2, 3]")
    assert [r["error"]["code"] for r in reply] == [-32600] * 3


@pytest.mark.parametrize(
    "payload",
    [b'"daemon.ping"', b'{"jsonrpc": "2.0", "id": 3}', b'{"method": 42, "id": 3}'],
    ids=["string", "no-method", "method-not-a-string"],
)
def test_json_that_is_not_a_request_gets_invalid_request(daemon: DaemonProcess, payload: bytes) -> None:
    reply = exchange(daemon, payload)
    assert reply["error"]["code"] == -32600


def test_a_request_of_another_jsonrpc_version_gets_invalid_request(daemon: DaemonProcess) -> None:
    reply = exchange(daemon, json.dumps({"jsonrpc": "1.0", "id": 5, "method": "daemon.ping"}).encode())
    assert reply["id"] == 5
    assert reply["error"]["code"] == -32600


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("cluster.status", {"cluster": 5}),
        ("cluster.status", {}),
        ("cluster.status", [1, 2]),
        ("job.events", {"job_id": "x", "cursor": "soon"}),
    ],
    ids=["wrong-type", "missing-field", "params-not-an-object", "cursor-not-an-int"],
)
def test_params_of_the_wrong_shape_get_invalid_params(
    daemon: DaemonProcess, method: str, params: Any
) -> None:
    reply = exchange(daemon, request(method, params))
    assert reply["id"] == 7
    assert reply["error"]["code"] == -32602


def test_an_unknown_field_on_a_mutating_method_gets_invalid_params(daemon: DaemonProcess) -> None:
    reply = exchange(daemon, request("job.cancel", {"job_id": "x", "force": True}))
    assert reply["error"]["code"] == -32602


def test_a_connection_survives_its_own_bad_frames(daemon: DaemonProcess) -> None:
    with raw_connect(daemon.socket_path) as sock:
        send_frame(sock, b"not json at all")
        first = read_frame(sock)
        send_frame(sock, request("daemon.ping", request_id=8))
        second = read_frame(sock)
    assert first is not None and first["error"]["code"] == -32700
    assert second is not None and second["id"] == 8 and second["result"]["pong"] is True


def test_a_notification_gets_no_reply_but_the_next_request_does(daemon: DaemonProcess) -> None:
    with raw_connect(daemon.socket_path) as sock:
        send_message(sock, {"jsonrpc": "2.0", "method": "daemon.ping"})
        send_frame(sock, request("daemon.ping", request_id=9))
        reply = read_frame(sock)
    assert reply is not None and reply["id"] == 9


def test_a_failing_notification_gets_no_error_reply_either(daemon: DaemonProcess) -> None:
    with raw_connect(daemon.socket_path) as sock:
        send_message(sock, {"jsonrpc": "2.0", "method": "no.such.method"})
        send_message(sock, {"jsonrpc": "2.0", "method": "cluster.status", "params": {"cluster": 1}})
        send_frame(sock, request("daemon.ping", request_id=10))
        reply = read_frame(sock)
    assert reply is not None and reply["id"] == 10 and reply["result"]["pong"] is True


def test_an_oversized_frame_header_gets_frame_too_large_and_the_connection_is_closed(
    daemon: DaemonProcess,
) -> None:
    with raw_connect(daemon.socket_path) as sock:
        sock.sendall(struct.pack(">I", 0x7FFF_FFFF))
        reply = read_frame(sock)
        rest = wait_closed(sock, timeout=10)
    assert reply is not None
    assert_no_traceback(reply)
    assert reply["id"] is None
    assert reply["error"]["code"] == -32600
    assert reply["error"]["data"]["reason"] == "frame_too_large"
    assert reply["error"]["data"]["size"] == 0x7FFF_FFFF
    assert rest == b""


def test_other_clients_are_answered_while_one_sends_an_oversized_frame(daemon: DaemonProcess) -> None:
    with raw_connect(daemon.socket_path) as good, raw_connect(daemon.socket_path) as bad:
        send_frame(good, request("daemon.ping", request_id=1))
        bad.sendall(struct.pack(">I", 0xFFFF_FFFF))
        send_frame(good, request("daemon.ping", request_id=2))
        answers = [read_frame(good), read_frame(good)]
        wait_closed(bad, timeout=10)
    assert [a["id"] for a in answers if a is not None] == [1, 2]


def test_a_client_that_stalls_inside_a_frame_is_closed_after_the_read_timeout(
    daemon: DaemonProcess,
) -> None:
    with raw_connect(daemon.socket_path) as sock:
        sock.sendall(struct.pack(">I", 100) + b'{"jsonrpc": "2.0"')
        # No reply: a frame that never completes is dropped, the connection closed.
        assert wait_closed(sock, timeout=10) == b""


def test_an_idle_connection_is_closed_after_the_idle_timeout(daemon: DaemonProcess) -> None:
    with raw_connect(daemon.socket_path) as sock:
        opened = time.monotonic()
        send_frame(sock, request("daemon.ping", request_id=1))
        assert read_frame(sock) is not None
        assert wait_closed(sock, timeout=10) == b""
        # The timer cannot fire early: the close came after the idle timeout, not before.
        assert time.monotonic() - opened >= IDLE_TIMEOUT_S * 0.9


def test_a_client_that_hangs_up_mid_frame_does_not_disturb_the_daemon(daemon: DaemonProcess) -> None:
    with raw_connect(daemon.socket_path) as sock:
        sock.sendall(struct.pack(">I", 50) + b"{")
    with raw_connect(daemon.socket_path) as sock:
        sock.sendall(b"\x00\x00")
