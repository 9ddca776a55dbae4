"""JSON-RPC 2.0 exactly, in raw frames: every example of the specification's section 7
(https://www.jsonrpc.org/specification#examples), adapted to a table served by the real
RpcServer on a real Unix socket, plus the rules around ``jsonrpc``, ``id`` and ``params``.

"No reply" is asserted by sending a ping after the message under test: the next frame on the
connection must be the ping's reply.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from support.daemon_process import short_tmp_dir

from modelsmith.daemon.listener import bind_unix_socket
from modelsmith.rpc.dispatch import Empty, MethodTable, QueryParams
from modelsmith.rpc.peercred import PeerPolicy
from modelsmith.rpc.protocol import HEADER, frame
from modelsmith.rpc.server import CallContext, RpcServer

BOUND_S = 10
PING_ID = "ping-after"


class Operands(QueryParams):
    minuend: int
    subtrahend: int


class Values(QueryParams):
    values: list[int] = []


def spec_table() -> MethodTable:
    """The specification's methods: subtract, sum, update, notify_hello, get_data (+ a ping)."""
    table = MethodTable()

    async def ping(params: Empty, ctx: CallContext) -> dict[str, bool]:
        return {"pong": True}

    async def subtract(params: Operands, ctx: CallContext) -> int:
        return params.minuend - params.subtrahend

    async def total(params: Values, ctx: CallContext) -> int:
        return sum(params.values)

    async def get_data(params: Empty, ctx: CallContext) -> list[Any]:
        return ["hello", 5]

    table.add("daemon.ping", Empty, ping, inline=True)
    table.add("subtract", Operands, subtract)
    table.add("sum", Values, total)
    table.add("update", Values, total)
    table.add("notify_hello", Values, total)
    table.add("get_data", Empty, get_data)
    return table


class RawPeer:
    """A client that writes and reads raw frames: nothing is checked or fixed on its side."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self._stream = stream
        self._reader = BufferedByteReceiveStream(stream)

    async def send(self, body: bytes | str) -> None:
        await self._stream.send(frame(body.encode() if isinstance(body, str) else body))

    async def receive(self) -> Any:
        header = await self._reader.receive_exactly(HEADER.size)
        (size,) = HEADER.unpack(header)
        return json.loads(await self._reader.receive_exactly(size))

    async def exchange(self, body: bytes | str) -> Any:
        await self.send(body)
        return await self.receive()

    async def assert_no_reply_to(self, body: bytes | str) -> None:
        await self.send(body)
        await self.send(json.dumps({"jsonrpc": "2.0", "method": "daemon.ping", "id": PING_ID}))
        assert await self.receive() == {"jsonrpc": "2.0", "id": PING_ID, "result": {"pong": True}}


@asynccontextmanager
async def raw_peer() -> AsyncIterator[RawPeer]:
    with short_tmp_dir() as base:
        path = base / "run" / "rpc.sock"
        listener = await anyio.abc.SocketListener.from_socket(bind_unix_socket(path))
        server = RpcServer(spec_table(), policy=PeerPolicy.for_current_process())
        with anyio.fail_after(BOUND_S):
            async with anyio.create_task_group() as tg:
                await tg.start(server.serve, listener)
                async with await anyio.connect_unix(str(path)) as stream:
                    yield RawPeer(stream)
                tg.cancel_scope.cancel()


def error(code: int, request_id: Any) -> dict[str, Any]:
    """The parts of an error reply the specification fixes (``data`` is ours)."""
    return {"jsonrpc": "2.0", "id": request_id, "code": code}


def shape(reply: dict[str, Any]) -> dict[str, Any]:
    assert set(reply) == {"jsonrpc", "id", "error"}, reply
    return {"jsonrpc": reply["jsonrpc"], "id": reply["id"], "code": reply["error"]["code"]}


# -- section 7, one example each ---------------------------------------------------------------


async def test_positional_params_are_refused_with_invalid_params_as_docs_rpc_md_says() -> None:
    async with raw_peer() as peer:
        reply = await peer.exchange('{"jsonrpc": "2.0", "method": "subtract", "params": [42, 23], "id": 1}')
    assert shape(reply) == error(-32602, 1)


async def test_named_params_get_the_result_under_the_requests_id() -> None:
    async with raw_peer() as peer:
        first = await peer.exchange(
            '{"jsonrpc": "2.0", "method": "subtract", "params": {"subtrahend": 23, "minuend": 42}, "id": 3}'
        )
        second = await peer.exchange(
            '{"jsonrpc": "2.0", "method": "subtract", "params": {"minuend": 42, "subtrahend": 23}, "id": 4}'
        )
    assert first == {"jsonrpc": "2.0", "result": 19, "id": 3}
    assert second == {"jsonrpc": "2.0", "result": 19, "id": 4}


async def test_a_notification_gets_no_reply() -> None:
    async with raw_peer() as peer:
        await peer.assert_no_reply_to('{"jsonrpc": "2.0", "method": "update", "params": {"values": [1, 2, 3, 4, 5]}}')
        await peer.assert_no_reply_to('{"jsonrpc": "2.0", "method": "foobar"}')


async def test_a_method_that_does_not_exist_gets_method_not_found() -> None:
    async with raw_peer() as peer:
        reply = await peer.exchange('{"jsonrpc": "2.0", "method": "foobar", "id": "1"}')
    assert shape(reply) == error(-32601, "1")


async def test_invalid_json_gets_a_parse_error_with_a_null_id() -> None:
    async with raw_peer() as peer:
        reply = await peer.exchange('{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]')
    assert shape(reply) == error(-32700, None)


async def test_an_invalid_request_object_gets_invalid_request_with_a_null_id() -> None:
    async with raw_peer() as peer:
        reply = await peer.exchange('{"jsonrpc": "2.0", "method": 1, "params": "bar"}')
    assert shape(reply) == error(-32600, None)


async def test_a_batch_that_is_invalid_json_gets_one_parse_error() -> None:
    async with raw_peer() as peer:
        reply = await peer.exchange(
            '[{"jsonrpc": "2.0", "method": "sum", "params": {"values": [1,2,4]}, "id": "1"},'
            '{"jsonrpc": "2.0", "method"\n]'
        )
    assert shape(reply) == error(-32700, None)


async def test_an_empty_batch_gets_one_invalid_request_not_an_array() -> None:
    async with raw_peer() as peer:
        reply = await peer.exchange("[]")
    assert shape(reply) == error(-32600, None)


async def test_a_batch_of_one_non_request_gets_an_array_of_one_invalid_request() -> None:
    async with raw_peer() as peer:
        reply = await peer.exchange("[1]")
    assert [shape(r) for r in reply] == [error(-32600, None)]


async def test_a_batch_of_three_non_requests_gets_three_invalid_requests() -> None:
    async with raw_peer() as peer:
        reply = await peer.exchange("[1,2,3]")
    assert [shape(r) for r in reply] == [error(-32600, None)] * 3


async def test_a_mixed_batch_answers_each_request_and_no_notification() -> None:
    async with raw_peer() as peer:
        reply = await peer.exchange("""[
            {"jsonrpc": "2.0", "method": "sum", "params": {"values": [1,2,4]}, "id": "1"},
            {"jsonrpc": "2.0", "method": "notify_hello", "params": {"values": [7]}},
            {"jsonrpc": "2.0", "method": "subtract", "params": {"minuend": 42, "subtrahend": 23}, "id": "2"},
            {"foo": "boo"},
            {"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},
            {"jsonrpc": "2.0", "method": "get_data", "id": "9"}
        ]""")
    assert isinstance(reply, list) and len(reply) == 5
    by_id = {r["id"]: r for r in reply if r["id"] is not None}
    assert by_id["1"] == {"jsonrpc": "2.0", "result": 7, "id": "1"}
    assert by_id["2"] == {"jsonrpc": "2.0", "result": 19, "id": "2"}
    assert shape(by_id["5"]) == error(-32601, "5")
    assert by_id["9"] == {"jsonrpc": "2.0", "result": ["hello", 5], "id": "9"}
    assert [shape(r) for r in reply if r["id"] is None] == [error(-32600, None)]


async def test_a_batch_of_notifications_gets_no_frame_at_all() -> None:
    async with raw_peer() as peer:
        await peer.assert_no_reply_to("""[
            {"jsonrpc": "2.0", "method": "notify_sum", "params": {"values": [1,2,4]}},
            {"jsonrpc": "2.0", "method": "notify_hello", "params": {"values": [7]}}
        ]""")


# -- the rules around jsonrpc, id and params ---------------------------------------------------


async def test_every_reply_carries_jsonrpc_2_0_results_and_errors_alike() -> None:
    async with raw_peer() as peer:
        ok = await peer.exchange('{"jsonrpc": "2.0", "method": "daemon.ping", "id": 1}')
        failed = await peer.exchange('{"jsonrpc": "2.0", "method": "nope", "id": 2}')
        unparsable = await peer.exchange("{")
    assert [r["jsonrpc"] for r in (ok, failed, unparsable)] == ["2.0"] * 3


@pytest.mark.parametrize(
    "request_",
    [
        {"method": "daemon.ping", "id": 7},
        {"jsonrpc": "1.0", "method": "daemon.ping", "id": 7},
        {"jsonrpc": 2.0, "method": "daemon.ping", "id": 7},
    ],
    ids=["no-jsonrpc", "version-1.0", "version-a-number"],
)
async def test_a_request_that_is_not_jsonrpc_2_0_gets_invalid_request_with_its_id(
    request_: dict[str, Any],
) -> None:
    async with raw_peer() as peer:
        reply = await peer.exchange(json.dumps(request_))
    assert shape(reply) == error(-32600, 7)


async def test_a_non_2_0_message_without_an_id_still_gets_invalid_request_with_a_null_id() -> None:
    async with raw_peer() as peer:
        reply = await peer.exchange('{"jsonrpc": "1.0", "method": "daemon.ping"}')
    assert shape(reply) == error(-32600, None)


async def test_an_id_that_is_not_a_string_number_or_null_gets_invalid_request_with_a_null_id() -> None:
    async with raw_peer() as peer:
        replies = [
            await peer.exchange(json.dumps({"jsonrpc": "2.0", "method": "daemon.ping", "id": bad}))
            for bad in ({"a": 1}, [1], True)
        ]
    assert [shape(r) for r in replies] == [error(-32600, None)] * 3


async def test_a_request_with_a_null_id_is_answered_with_a_null_id() -> None:
    async with raw_peer() as peer:
        reply = await peer.exchange('{"jsonrpc": "2.0", "method": "daemon.ping", "id": null}')
    assert reply == {"jsonrpc": "2.0", "id": None, "result": {"pong": True}}


@pytest.mark.parametrize("params", ['"bar"', "3", "null", "true"], ids=["string", "number", "null", "bool"])
async def test_params_that_are_not_an_object_or_array_get_invalid_request(params: str) -> None:
    async with raw_peer() as peer:
        reply = await peer.exchange(f'{{"jsonrpc": "2.0", "method": "daemon.ping", "params": {params}, "id": 4}}')
    assert shape(reply) == error(-32600, 4)
    assert reply["error"]["data"]["reason"] == "params_not_structured"


async def test_a_notification_with_params_of_the_wrong_kind_is_still_answered_as_invalid() -> None:
    async with raw_peer() as peer:
        reply = await peer.exchange('{"jsonrpc": "2.0", "method": "daemon.ping", "params": "bar"}')
    assert shape(reply) == error(-32600, None)


async def test_a_message_nested_past_the_limit_gets_invalid_request_naming_the_limit() -> None:
    deep = '{"jsonrpc": "2.0", "method": "sum", "id": 1, "params": {"values": ' + "[" * 100 + "]" * 100 + "}}"
    async with raw_peer() as peer:
        reply = await peer.exchange(deep)
        after = await peer.exchange('{"jsonrpc": "2.0", "method": "daemon.ping", "id": 2}')
    assert shape(reply) == error(-32600, None)
    assert reply["error"]["data"] == {"name": "invalid_request", "reason": "too_deep", "limit": 64}
    assert after["result"] == {"pong": True}


async def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    text = "[{" * 500
    async with raw_peer() as peer:
        reply = await peer.exchange(json.dumps({"jsonrpc": "2.0", "method": "daemon.ping", "params": {"note": text}, "id": 1}))
    assert reply["result"] == {"pong": True}
