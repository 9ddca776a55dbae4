"""What one frame from a client is: a request, a notification, a batch of them, or an error.

JSON-RPC 2.0 exactly (https://www.jsonrpc.org/specification):

- a request must carry ``"jsonrpc": "2.0"`` and a string ``method``; ``id`` (when present) is a
  string, an integer or null. A request without ``id`` is a notification; ``"id": null`` is a
  request whose reply carries ``"id": null``;
- ``params``, when present, is an object (by name). An array (positional) is refused with
  -32602 by the method's own params decoding; any other JSON value is an invalid request;
- a message that is not a valid request is always answered (-32600), with its ``id`` when
  that can be read and null otherwise, even when it has no ``id``; a valid notification is
  never answered, not even with an error;
- a frame that is a JSON array is a batch: one reply array for the requests in it (nothing for
  its notifications, no frame at all when all are); an empty array is one -32600 reply.

Nesting is bounded before msgspec sees a byte (:func:`nesting_exceeds`), so a deep frame can
not reach the decoder's recursion limit: :data:`MAX_NESTING_DEPTH` levels of arrays/objects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

from modelsmith.errors import InvalidRequest, ModelsmithError, ParseError

__all__ = [
    "MAX_NESTING_DEPTH",
    "Batch",
    "Call",
    "Invalid",
    "nesting_exceeds",
    "parse_frame",
    "parse_message",
    "too_deep_error",
]

MAX_NESTING_DEPTH = 64

# A JSON string (escapes included): brackets inside one do not nest anything.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_BRACKET = re.compile(rb"[\[\]{}]")
_OPENERS = frozenset(b"[{")


def nesting_exceeds(body: bytes, limit: int = MAX_NESTING_DEPTH) -> bool:
    """Whether arrays/objects in ``body`` nest deeper than ``limit`` (strings do not count).

    Nearly every frame has fewer brackets than the limit in all, which settles it with two
    C-level counts; only the rest are walked bracket by bracket.
    """
    if body.count(b"{") + body.count(b"[") <= limit:
        return False
    depth = 0
    for match in _BRACKET.finditer(_STRING.sub(b"", body)):
        if match.group()[0] in _OPENERS:
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def too_deep_error(limit: int = MAX_NESTING_DEPTH) -> InvalidRequest:
    return InvalidRequest(
        f"the message nests arrays/objects deeper than {limit} levels",
        data={"reason": "too_deep", "limit": limit},
    )


class _WireRequest(msgspec.Struct):
    jsonrpc: Literal["2.0"]
    method: str
    params: msgspec.Raw = msgspec.Raw(b"{}")
    id: int | str | UnsetType | None = UNSET


class _AnyId(msgspec.Struct):
    id: Any = UNSET


_request_decoder = msgspec.json.Decoder(_WireRequest)
_id_decoder = msgspec.json.Decoder(_AnyId)
_batch_decoder = msgspec.json.Decoder(list[msgspec.Raw])


@dataclass(frozen=True, slots=True)
class Call:
    """A valid request (``id`` set, possibly None) or notification (``id`` UNSET)."""

    method: str
    params: bytes
    id: int | str | UnsetType | None

    @property
    def is_notification(self) -> bool:
        return self.id is UNSET


@dataclass(frozen=True, slots=True)
class Invalid:
    """A message that gets an error reply whatever it carries: ``id`` is None if unreadable."""

    error: ModelsmithError
    id: int | str | None = None


@dataclass(frozen=True, slots=True)
class Batch:
    """A non-empty JSON array: each member is parsed on its own with :func:`parse_message`."""

    members: list[bytes]


def parse_frame(body: bytes) -> Call | Invalid | Batch:
    """The body of one frame (already checked with :func:`nesting_exceeds`)."""
    if body.lstrip()[:1] == b"[":
        try:
            members = _batch_decoder.decode(body)
        except msgspec.DecodeError as exc:
            return Invalid(ParseError(f"frame is not valid JSON: {exc}"))
        if not members:
            return Invalid(InvalidRequest("an empty batch", data={"reason": "empty_batch"}))
        return Batch([bytes(member) for member in members])
    return parse_message(body)


def parse_message(body: bytes) -> Call | Invalid:
    """One JSON-RPC message (a frame's body, or one member of a batch)."""
    try:
        request = _request_decoder.decode(body)
    except msgspec.ValidationError as exc:
        return Invalid(InvalidRequest(f"not a JSON-RPC 2.0 request: {exc}"), _readable_id(body))
    except msgspec.DecodeError as exc:
        return Invalid(ParseError(f"frame is not valid JSON: {exc}"))
    except RecursionError:  # unreachable after the nesting scan; never let it out
        return Invalid(too_deep_error())
    params = bytes(request.params)
    if params[:1] not in (b"{", b"["):
        request_id = None if request.id is UNSET else request.id
        return Invalid(
            InvalidRequest("params must be an object", data={"reason": "params_not_structured"}),
            request_id,
        )
    return Call(request.method, params, request.id)


def _readable_id(body: bytes) -> int | str | None:
    """The ``id`` of a message that is not a valid request, when it is a valid id."""
    try:
        value = _id_decoder.decode(body).id
    except (msgspec.DecodeError, RecursionError):
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    return value
