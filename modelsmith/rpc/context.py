"""What an RPC handler may know about its caller and do on its connection.

Its own module so that the method table (:mod:`modelsmith.rpc.dispatch`) and the server
(:mod:`modelsmith.rpc.server`) both use it without importing each other. Standard library only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from modelsmith.rpc.peercred import PeerCredentials

__all__ = ["CallContext", "PeerConnection"]


class PeerConnection(Protocol):
    """The caller's connection as a handler sees it (the server's ``Connection`` implements it)."""

    peer: PeerCredentials
    closed: bool

    async def notify(self, method: str, params: Any) -> None:
        """Send a server-to-client notification (no id, no reply expected)."""
        ...

    def start_subscription(self, stream_fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``stream_fn`` in the connection's task group until it returns or the peer leaves."""
        ...


@dataclass(slots=True)
class CallContext:
    """What a handler may know about its caller and do on its connection."""

    peer: PeerCredentials
    connection: PeerConnection
    extras: dict[str, Any] = field(default_factory=dict)
