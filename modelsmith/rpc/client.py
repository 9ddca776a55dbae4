"""RPC clients: a blocking one for the CLI (standard library + msgspec only) and an anyio one.

Both find the socket with :func:`modelsmith.rpc.address.resolve_socket_path`, raise
:class:`~modelsmith.errors.DaemonUnreachable` naming the socket when nobody answers there, and
turn error envelopes back into typed :class:`~modelsmith.errors.ModelsmithError` subclasses.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from modelsmith.errors import DaemonUnreachable, InternalError, ProtocolError
from modelsmith.rpc.address import resolve_socket_path
from modelsmith.rpc.errors import error_from_wire
from modelsmith.rpc.protocol import (
    DEFAULT_MAX_FRAME,
    HEADER,
    IncomingMessage,
    Request,
    encoder,
    frame,
    frame_length,
)

T = TypeVar("T")

_incoming = msgspec.json.Decoder(IncomingMessage)


def _raw_or(raw: msgspec.Raw, default: bytes) -> msgspec.Raw:
    return raw if len(raw) else msgspec.Raw(default)


def _decode_result(raw: msgspec.Raw, result_type: type[T], method: str) -> T:
    """The result as ``result_type``; an answer of another shape is a typed error, not a crash."""
    try:
        return msgspec.json.decode(_raw_or(raw, b"null"), type=result_type)
    except msgspec.ValidationError as exc:
        raise InternalError(f"the daemon's answer to {method} has an unexpected shape: {exc}",
                            data={"method": method}) from exc


def _encode_request(method: str, params: Any, request_id: int) -> bytes:
    raw = msgspec.Raw(encoder.encode(params if params is not None else {}))
    return frame(encoder.encode(Request(method=method, params=raw, id=request_id)))


def _unreachable(path: Path, exc: OSError) -> DaemonUnreachable:
    return DaemonUnreachable(
        f"no Modelsmith daemon is answering at {path} ({exc.strerror or exc}); "
        "start one with `modelsmith daemon` or pass --socket / set MODELSMITH_SOCKET",
        data={"socket": str(path)},
    )


class Notice(msgspec.Struct):
    """A notification the daemon pushed to this client."""

    method: str
    params: msgspec.Raw

    def decode(self, type: type[T]) -> T:
        return msgspec.json.decode(self.params, type=type)


class RpcClient:
    """Blocking client over one connection. Use as a context manager."""

    def __init__(
        self,
        socket_path: str | Path | None = None,
        *,
        timeout: float | None = 30.0,
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        self.path = resolve_socket_path(socket_path)
        self.timeout = timeout
        self.max_frame = max_frame
        self._sock: socket.socket | None = None
        self._ids = itertools.count(1)
        self._pending_notices: list[Notice] = []

    def __enter__(self) -> RpcClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            raise _unreachable(self.path, exc) from exc
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _recv_exactly(self, n: int) -> bytes:
        assert self._sock is not None
        chunks = bytearray()
        while len(chunks) < n:
            chunk = self._sock.recv(n - len(chunks))
            if not chunk:
                raise DaemonUnreachable(
                    f"the daemon at {self.path} closed the connection", data={"socket": str(self.path)}
                )
            chunks += chunk
        return bytes(chunks)

    def _read_message(self) -> IncomingMessage:
        size = frame_length(self._recv_exactly(HEADER.size), self.max_frame)
        return _incoming.decode(self._recv_exactly(size))

    def call(self, method: str, params: Any = None, *, result_type: type[T] = Any) -> T:  # type: ignore[assignment]
        """Call ``method`` and return its result decoded as ``result_type``.

        An error reply raises its typed :class:`~modelsmith.errors.ModelsmithError`; a result of
        another shape raises :class:`~modelsmith.errors.InternalError`. Notifications that arrive
        before the reply are kept for :meth:`notifications`.
        """
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        request_id = next(self._ids)
        try:
            self._sock.sendall(_encode_request(method, params, request_id))
            while True:
                msg = self._read_message()
                if msg.method is not None and msg.id is None:
                    self._pending_notices.append(Notice(msg.method, _raw_or(msg.params, b"{}")))
                    continue
                if msg.id != request_id and msg.id is not None:
                    continue
                if msg.error is not None:
                    raise error_from_wire(msg.error)
                if msg.id is None:
                    raise ProtocolError("the daemon answered without an id")
                return _decode_result(msg.result, result_type, method)
        except OSError as exc:
            raise _unreachable(self.path, exc) from exc

    def notifications(self) -> Iterator[Notice]:
        """Yield notifications as they arrive (blocking; the socket timeout bounds each wait)."""
        while True:
            while self._pending_notices:
                yield self._pending_notices.pop(0)
            try:
                msg = self._read_message()
            except OSError as exc:
                raise _unreachable(self.path, exc) from exc
            if msg.method is not None and msg.id is None:
                yield Notice(msg.method, _raw_or(msg.params, b"{}"))


class AsyncRpcClient:
    """anyio client: many concurrent calls on one connection, notifications on a stream.

    Use :func:`connect` to open one; it owns a reader task in its own task group.
    """

    def __init__(self, path: Path, max_frame: int) -> None:
        import anyio

        self.path = path
        self.max_frame = max_frame
        self._ids = itertools.count(1)
        self._waiters: dict[int, Any] = {}
        self._send_lock = anyio.Lock()
        self._stream: Any = None
        send, receive = anyio.create_memory_object_stream[Notice](1024)
        self._notice_send = send
        self.notices = receive

    async def call(self, method: str, params: Any = None, *, result_type: type[T] = Any) -> T:  # type: ignore[assignment]
        """Like :meth:`RpcClient.call`; many calls may wait on one connection at once."""
        import anyio

        request_id = next(self._ids)
        done = anyio.Event()
        slot: dict[str, IncomingMessage] = {}
        self._waiters[request_id] = (done, slot)
        try:
            async with self._send_lock:
                try:
                    await self._stream.send(_encode_request(method, params, request_id))
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                    raise DaemonUnreachable(
                        f"lost the connection to {self.path}", data={"socket": str(self.path)}
                    ) from exc
            await done.wait()
        finally:
            self._waiters.pop(request_id, None)
        msg = slot.get("msg")
        if msg is None:
            raise DaemonUnreachable(
                f"the daemon at {self.path} closed the connection", data={"socket": str(self.path)}
            )
        if msg.error is not None:
            raise error_from_wire(msg.error)
        return _decode_result(msg.result, result_type, method)

    async def _reader(self) -> None:
        import anyio
        from anyio.streams.buffered import BufferedByteReceiveStream

        reader = BufferedByteReceiveStream(self._stream)
        try:
            while True:
                header = await reader.receive_exactly(HEADER.size)
                msg = _incoming.decode(await reader.receive_exactly(frame_length(header, self.max_frame)))
                if msg.method is not None and msg.id is None:
                    await self._notice_send.send(Notice(msg.method, _raw_or(msg.params, b"{}")))
                    continue
                if msg.id is None and msg.error is not None:
                    # A connection-level error (e.g. frame too large): fail every waiter with it.
                    for done, slot in list(self._waiters.values()):
                        slot["msg"] = msg
                        done.set()
                    continue
                waiter = self._waiters.get(msg.id)  # type: ignore[arg-type]
                if waiter is not None:
                    waiter[1]["msg"] = msg
                    waiter[0].set()
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        finally:
            for done, _slot in list(self._waiters.values()):
                done.set()
            self._notice_send.close()


@asynccontextmanager
async def connect(
    socket_path: str | Path | None = None, *, max_frame: int = DEFAULT_MAX_FRAME
) -> AsyncIterator[AsyncRpcClient]:
    """Open an :class:`AsyncRpcClient`; the connection closes when the block exits."""
    import anyio

    path = resolve_socket_path(socket_path)
    client = AsyncRpcClient(path, max_frame)
    try:
        client._stream = await anyio.connect_unix(str(path))
    except OSError as exc:
        raise _unreachable(path, exc) from exc
    error: Exception | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(client._reader)
        try:
            yield client
        except Exception as exc:
            # Re-raised below, outside the task group: the caller gets the typed error itself,
            # not an exception group (and cancelling the group here would swallow it).
            error = exc
        finally:
            await client._stream.aclose()  # ends the reader
    if error is not None:
        raise error
