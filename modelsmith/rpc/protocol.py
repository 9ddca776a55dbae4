"""JSON-RPC 2.0 envelopes and the length-prefixed framing used on the Unix socket.

A frame is a 4-byte big-endian length followed by that many bytes of one JSON-RPC message
(msgspec-encoded). Frames above ``max_frame`` are refused before their body is read.

Imports only the standard library and msgspec: the CLI's hot path goes through here.
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

DEFAULT_MAX_FRAME = 4 * 1024 * 1024
HEADER = struct.Struct(">I")


class ErrorObject(msgspec.Struct, omit_defaults=True):
    """The typed error envelope: ``code`` is the contract, ``message`` is for people.

    ``data`` always carries ``{"name": <error name>}`` plus error-specific detail
    (for example ``{"field": "threshold.composite", "file": ".../cluster.toml"}``).
    """

    code: int
    message: str
    data: dict[str, Any] | None = None


class Request(msgspec.Struct, kw_only=True):
    """A request as a client sends it. Without ``id`` (UNSET) it is a notification; an explicit
    ``id=None`` is a request whose reply carries ``"id": null`` (valid, if discouraged)."""

    jsonrpc: str = "2.0"
    method: str
    params: msgspec.Raw = msgspec.Raw(b"{}")
    id: int | str | UnsetType | None = UNSET


class Response(msgspec.Struct, kw_only=True):
    """A reply: ``jsonrpc`` and ``id`` are always on the wire (``id`` null when the request's
    could not be read), and exactly one of ``result`` and ``error``."""

    jsonrpc: str = "2.0"
    id: int | str | None
    result: msgspec.Raw | UnsetType = UNSET
    error: ErrorObject | UnsetType = UNSET


class Notification(msgspec.Struct, kw_only=True):
    jsonrpc: str = "2.0"
    method: str
    params: msgspec.Raw


class IncomingMessage(msgspec.Struct, omit_defaults=True):
    """What a client reads: a response (has ``id``) or a notification (has ``method``)."""

    jsonrpc: str = "2.0"
    id: int | str | None = None
    method: str | None = None
    # msgspec.Raw cannot sit in a union; an absent member decodes as an empty Raw.
    params: msgspec.Raw = msgspec.Raw(b"")
    result: msgspec.Raw = msgspec.Raw(b"")
    error: ErrorObject | None = None


class FrameTooLarge(Exception):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


encoder = msgspec.json.Encoder()


def frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


def frame_length(header: bytes, max_frame: int) -> int:
    (size,) = HEADER.unpack(header)
    if size > max_frame:
        raise FrameTooLarge(size, max_frame)
    return int(size)
