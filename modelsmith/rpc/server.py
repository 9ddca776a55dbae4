"""The RPC server: JSON-RPC 2.0 over a Unix stream socket, one message per length-prefixed frame.

Resources and errors, per connection:
- the peer's uid/gid (SO_PEERCRED) is checked before any byte is read; a refused peer is closed;
- a frame header announcing more than ``max_frame`` bytes gets one typed error and a close,
  without reading the body; a body must arrive within ``read_timeout``;
- a connection with no request in flight and no subscription is closed after ``idle_timeout``;
- requests on one connection run concurrently (bounded by ``max_inflight``), responses are
  written under a lock so frames never interleave;
- a frame nesting deeper than :data:`~modelsmith.rpc.inbound.MAX_NESTING_DEPTH` is answered
  -32600 (``data.reason = "too_deep"``) without being decoded;
- every exception becomes a typed error envelope (:func:`error_to_wire`); nothing crashes the
  server and no traceback reaches a client. An exception that escapes one connection's handling
  anyway ends that connection only (logged), never the accept loop.

Per server: connections are capped in total and per uid (:mod:`modelsmith.rpc.admission`); an
``accept()`` that fails for lack of descriptors backs off and the loop goes on.
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import msgspec
import structlog
from anyio.streams.buffered import BufferedByteReceiveStream
from msgspec import UnsetType

from modelsmith.errors import InternalError, InvalidRequest
from modelsmith.rpc.admission import (
    RESOURCE_ERRNOS,
    AcceptBackoff,
    ConnectionCaps,
    effective_total_cap,
)
from modelsmith.rpc.context import CallContext
from modelsmith.rpc.dispatch import MethodTable
from modelsmith.rpc.errors import error_to_wire
from modelsmith.rpc.inbound import (
    Batch,
    Call,
    Invalid,
    nesting_exceeds,
    parse_frame,
    parse_message,
    too_deep_error,
)
from modelsmith.rpc.peercred import PeerCredentials, PeerPolicy, peer_credentials
from modelsmith.rpc.protocol import (
    DEFAULT_MAX_FRAME,
    HEADER,
    ErrorObject,
    FrameTooLarge,
    Notification,
    Response,
    encoder,
    frame,
    frame_length,
)

# CallContext lives in modelsmith.rpc.context; it is re-exported here for the handlers that
# import it from this module.
__all__ = ["REPLY_SEND_TIMEOUT_S", "CallContext", "Connection", "RpcServer", "ServerLimits"]

log = structlog.get_logger("modelsmith.rpc")

class _MethodPeek(msgspec.Struct):
    method: str = ""


_method_peek = msgspec.json.Decoder(_MethodPeek)

# How long a reply may take to reach a client that stopped reading.
REPLY_SEND_TIMEOUT_S = 5.0
# The one frame a connection over a cap gets: it fits any socket buffer, so this is a backstop.
REFUSAL_SEND_TIMEOUT_S = 1.0


@dataclass(frozen=True, slots=True)
class ServerLimits:
    max_frame: int = DEFAULT_MAX_FRAME
    read_timeout: float = 30.0
    idle_timeout: float = 300.0
    max_inflight: int = 64
    max_connections: int = 1024
    max_connections_per_uid: int = 256


class Connection:
    """One client connection. Handlers reach it through :class:`CallContext` (as a
    :class:`~modelsmith.rpc.context.PeerConnection`)."""

    def __init__(
        self, stream: anyio.abc.SocketStream, peer: PeerCredentials, task_group: anyio.abc.TaskGroup
    ) -> None:
        self._stream = stream
        self._raw_socket: socket.socket = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        # fast_acquire: an uncontended lock (the common case) costs no event-loop round trip.
        self._send_lock = anyio.Lock(fast_acquire=True)
        self._task_group = task_group
        self.peer = peer
        self.subscriptions = 0
        self.inflight = 0
        self.closed = False
        # Monotonic time of the last frame in either direction: idleness counts from here, so a
        # subscription that just ended (or a reply just sent) does not make the peer look idle.
        self.last_activity = time.monotonic()

    async def send_message(self, payload: bytes, *, shielded_timeout: float | None = None) -> None:
        """Send one frame; frames never interleave.

        With ``shielded_timeout`` the send goes on even while the connection's scope is being
        cancelled (a reply must reach its client), for at most that many seconds.
        """
        if self.closed:
            return
        self.last_activity = time.monotonic()
        data = frame(payload)
        try:
            if not self._send_lock.locked():
                # Fast path, without a single await: nobody else is sending, so the frame goes
                # straight to the non-blocking socket, which nearly always takes all of it.
                # (anyio's send() would first yield to the event loop: a whole extra loop turn.)
                self._send_lock.acquire_nowait()
                try:
                    rest = data[self._write_now(data) :]
                    if rest:
                        await self._send_rest(rest, shielded_timeout)
                finally:
                    self._send_lock.release()
                return
            if shielded_timeout is None:
                async with self._send_lock:
                    await self._stream.send(data)
                return
            with anyio.move_on_after(shielded_timeout, shield=True) as scope:
                async with self._send_lock:
                    await self._stream.send(data)
            if scope.cancelled_caught:
                self.closed = True
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            self.closed = True

    def _write_now(self, data: bytes) -> int:
        try:
            return self._raw_socket.send(data)
        except BlockingIOError:
            return 0

    async def _send_rest(self, rest: bytes, shielded_timeout: float | None) -> None:
        # The socket buffer is full: wait for writability through the stream (lock held).
        if shielded_timeout is None:
            await self._stream.send(rest)
            return
        with anyio.move_on_after(shielded_timeout, shield=True) as scope:
            await self._stream.send(rest)
        if scope.cancelled_caught:
            # Part of a frame is on the wire: nothing more can be sent on this connection.
            self.closed = True

    async def notify(self, method: str, params: Any) -> None:
        """Send a server-to-client notification (no id, no reply expected)."""
        await self.send_message(
            encoder.encode(Notification(method=method, params=msgspec.Raw(encoder.encode(params))))
        )

    def start_subscription(self, stream_fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``stream_fn`` in this connection's task group until it returns or the peer leaves.

        The task is owned by the connection (structured): closing the connection cancels it.
        """

        async def runner() -> None:
            self.subscriptions += 1
            try:
                await stream_fn()
            finally:
                self.subscriptions -= 1

        self._task_group.start_soon(runner)


class RpcServer:
    def __init__(
        self,
        table: MethodTable,
        *,
        policy: PeerPolicy,
        limits: ServerLimits | None = None,
    ) -> None:
        self.table = table
        self.policy = policy
        self.limits = limits or ServerLimits()
        self.connections_total = 0
        self.refused_peers = 0
        self.caps = ConnectionCaps(
            max_total=effective_total_cap(self.limits.max_connections),
            max_per_uid=self.limits.max_connections_per_uid,
        )
        if self.caps.max_total < self.limits.max_connections:
            log.info("connection cap lowered to fit the descriptor limit",
                     max_connections=self.caps.max_total, configured=self.limits.max_connections)

    async def serve(
        self,
        listener: anyio.abc.SocketListener,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        backoff = AcceptBackoff()
        async with listener, anyio.create_task_group() as connections:
            task_status.started()
            while True:
                try:
                    stream = await listener.accept()
                except anyio.BrokenResourceError as exc:
                    cause = exc.__cause__
                    if isinstance(cause, OSError) and cause.errno in RESOURCE_ERRNOS:
                        await anyio.sleep(backoff.failed(cause))
                        continue
                    if isinstance(cause, OSError) and cause.errno == errno.ECONNABORTED:
                        continue  # the peer left before we took it
                    raise
                backoff.succeeded()
                connections.start_soon(self._guarded_connection, stream)

    async def _guarded_connection(self, stream: anyio.abc.SocketStream) -> None:
        try:
            await self.handle_connection(stream)
        except Exception:  # a bug in one connection's handling must not end the accept loop
            log.exception("connection ended by an unexpected error")

    async def handle_connection(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            raw_sock: socket.socket = stream.extra(anyio.abc.SocketAttribute.raw_socket)
            try:
                peer = peer_credentials(raw_sock)
            except OSError:
                return
            if not self.policy.allows(peer):
                self.refused_peers += 1
                log.warning("peer refused", uid=peer.uid, gid=peer.gid, pid=peer.pid)
                return
            refusal = self.caps.admit(peer.uid)
            if refusal is not None:
                await self._send_refusal(stream, refusal)
                return
            self.connections_total += 1
            try:
                async with anyio.create_task_group() as tg:
                    connection = Connection(stream, peer, tg)
                    try:
                        await self._read_loop(stream, connection, tg)
                    finally:
                        connection.closed = True
                        tg.cancel_scope.cancel()
            finally:
                self.caps.release(peer.uid)

    async def _send_refusal(self, stream: anyio.abc.SocketStream, refusal: Exception) -> None:
        payload = frame(encoder.encode(Response(id=None, error=error_to_wire(refusal))))
        with anyio.move_on_after(REFUSAL_SEND_TIMEOUT_S):
            try:
                await stream.send(payload)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass

    async def _read_loop(
        self,
        stream: anyio.abc.SocketStream,
        connection: Connection,
        tg: anyio.abc.TaskGroup,
    ) -> None:
        reader = BufferedByteReceiveStream(stream)
        limiter = anyio.Semaphore(self.limits.max_inflight, fast_acquire=True)
        while not connection.closed:
            header: bytes | None = None
            with anyio.move_on_after(self.limits.idle_timeout) as idle:
                try:
                    header = await reader.receive_exactly(HEADER.size)
                except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
                    return
            if idle.cancelled_caught:
                quiet_for = time.monotonic() - connection.last_activity
                if connection.inflight or connection.subscriptions or quiet_for < self.limits.idle_timeout:
                    continue
                return
            connection.last_activity = time.monotonic()
            assert header is not None
            try:
                size = frame_length(header, self.limits.max_frame)
            except FrameTooLarge as exc:
                err = InvalidRequest(
                    str(exc), data={"limit": exc.limit, "size": exc.size, "reason": "frame_too_large"}
                )
                await connection.send_message(
                    encoder.encode(Response(id=None, error=error_to_wire(err)))
                )
                return
            try:
                if len(reader.buffer) >= size:
                    # The body came with its header (the common case): no read to time out.
                    body = await reader.receive_exactly(size)
                else:
                    with anyio.fail_after(self.limits.read_timeout):
                        body = await reader.receive_exactly(size)
            except (TimeoutError, anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
                return
            if nesting_exceeds(body):
                # Answered here, without decoding a byte of it: the id is not read either.
                await connection.send_message(
                    encoder.encode(Response(id=None, error=error_to_wire(too_deep_error())))
                )
                continue
            if self._inline(body):
                # A handler that never waits: serve it here, without a task of its own.
                connection.inflight += 1
                await self._serve_one(body, connection, None)
                continue
            await limiter.acquire()
            connection.inflight += 1
            tg.start_soon(self._serve_one, body, connection, limiter)

    def _inline(self, body: bytes) -> bool:
        try:
            return self.table.is_inline(_method_peek.decode(body).method)
        except Exception:  # malformed (or a batch): the dispatch path reports it
            return False

    async def _serve_one(
        self, body: bytes, connection: Connection, limiter: anyio.Semaphore | None
    ) -> None:
        try:
            reply = await self.dispatch(body, connection)
            if reply is not None:
                # The reply must reach the client even if the connection's scope is cancelled.
                await connection.send_message(reply, shielded_timeout=REPLY_SEND_TIMEOUT_S)
        finally:
            connection.inflight -= 1
            if limiter is not None:
                limiter.release()

    async def dispatch(self, body: bytes, connection: Connection) -> bytes | None:
        """Parse, route and run one frame's message (or batch); returns the encoded reply, None
        when nothing is to be sent (notifications). ``body`` has passed :func:`nesting_exceeds`."""
        message = parse_frame(body)
        if not isinstance(message, Batch):
            return await self._run(message, connection)
        replies = []
        for member in message.members:
            reply = await self._run(parse_message(member), connection)
            if reply is not None:
                replies.append(reply)
        if not replies:
            return None  # a batch of notifications gets no frame at all
        return b"[" + b",".join(replies) + b"]"

    async def _run(self, message: Call | Invalid, connection: Connection) -> bytes | None:
        if isinstance(message, Invalid):
            return encoder.encode(Response(id=message.id, error=error_to_wire(message.error)))
        request_id = None if isinstance(message.id, UnsetType) else message.id
        try:
            spec = self.table.get(message.method)
            params = spec.decode_params(message.params)
            ctx = CallContext(peer=connection.peer, connection=connection)
            result = await spec.handler(params, ctx)
            if message.is_notification:
                return None
            return encoder.encode(Response(id=request_id, result=msgspec.Raw(encoder.encode(result))))
        except Exception as exc:  # the one place every failure becomes a wire error
            error: ErrorObject = error_to_wire(exc)
            if error.code == InternalError.code:
                log.exception("internal error in RPC handler", request_id=request_id)
            if message.is_notification:
                # JSON-RPC: a valid notification never gets a reply, not even an error.
                return None
            return encoder.encode(Response(id=request_id, error=error))
