"""A maintained third-party JSON-RPC 2.0 client (tinyrpc, strict about replies) against the real
daemon process, through a small transport class over the daemon's 4-byte length framing."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.daemon_process import DaemonProcess, short_tmp_dir, start_daemon, write_cluster
from tinyrpc.client import RPCClient
from tinyrpc.protocols.jsonrpc import JSONRPCError, JSONRPCProtocol
from tinyrpc.transports import ClientTransport

_HEADER = struct.Struct(">I")


class FramedUnixTransport(ClientTransport):  # type: ignore[misc]
    """tinyrpc's transport over one Unix socket connection: ``>I`` length, then the JSON."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._sock.connect(str(path))

    def send_message(self, message: bytes, expect_reply: bool = True) -> bytes:
        self._sock.sendall(_HEADER.pack(len(message)) + message)
        if not expect_reply:
            return b""
        (size,) = _HEADER.unpack(self._recv_exactly(_HEADER.size))
        return self._recv_exactly(size)

    def _recv_exactly(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            chunk = self._sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("the daemon closed the connection")
            data += chunk
        return bytes(data)

    def close(self) -> None:
        self._sock.close()


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    with short_tmp_dir() as base:
        home = base / "home"
        write_cluster(home, "adtech")
        with start_daemon(home, socket_path=base / "run" / "ms.sock") as process:
            yield process


@pytest.fixture
def client(daemon: DaemonProcess) -> Iterator[RPCClient]:
    transport = FramedUnixTransport(daemon.socket_path)
    try:
        yield RPCClient(JSONRPCProtocol(), transport)
    finally:
        transport.close()


def test_tinyrpc_calls_daemon_ping_and_accepts_the_reply(client: RPCClient) -> None:
    result = client.call("daemon.ping", [], {})
    assert result["pong"] is True


def test_tinyrpc_gets_a_typed_error_with_code_and_data_for_an_unknown_cluster(client: RPCClient) -> None:
    with pytest.raises(JSONRPCError) as caught:
        client.call("cluster.status", [], {"cluster": "no-such-cluster"})
    assert caught.value._jsonrpc_error_code == 1001
    assert caught.value.data["name"] == "not_found"
    assert caught.value.data["cluster"] == "no-such-cluster"


def test_tinyrpc_gets_method_not_found_and_invalid_params(client: RPCClient) -> None:
    with pytest.raises(JSONRPCError) as unknown:
        client.call("daemon.nonsense", [], {})
    with pytest.raises(JSONRPCError) as positional:
        client.call("cluster.status", ["adtech"], {})
    assert unknown.value._jsonrpc_error_code == -32601
    assert positional.value._jsonrpc_error_code == -32602


def test_tinyrpc_batch_gets_one_reply_per_request_and_none_for_its_notification(
    daemon: DaemonProcess, client: RPCClient
) -> None:
    protocol = client.protocol
    batch = protocol.create_batch_request([
        protocol.create_request("daemon.ping", [], {}),
        protocol.create_request("daemon.ping", [], {}, one_way=True),
        protocol.create_request("cluster.status", [], {"cluster": "adtech"}),
    ])
    replies = protocol.parse_reply(client.transport.send_message(batch.serialize()))
    assert len(replies) == 2
    assert replies[0].result["pong"] is True
    assert replies[1].result["cluster"] == "adtech"
