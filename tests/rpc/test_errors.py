"""The error contract: stable codes, and errors that survive the trip over the wire typed."""

from __future__ import annotations

import msgspec
import pytest

from modelsmith import errors
from modelsmith.errors import ModelsmithError, error_class_for_code
from modelsmith.rpc.errors import error_from_wire, error_to_wire
from modelsmith.rpc.protocol import (
    DEFAULT_MAX_FRAME,
    ErrorObject,
    FrameTooLarge,
    IncomingMessage,
    Request,
    frame,
    frame_length,
)

# The documented table (docs/rpc.md): changing a code breaks every client.
STABLE_CODES = {
    "ParseError": -32700,
    "InvalidRequest": -32600,
    "MethodNotFound": -32601,
    "InvalidParams": -32602,
    "InternalError": -32603,
    "NotFound": 1001,
    "ValidationError": 1002,
    "ConflictError": 1003,
    "PermissionDenied": 1004,
    "GateFailed": 1005,
    "SignatureError": 1006,
    "EngineError": 1007,
    "TrainerError": 1008,
    "LedgerCorrupt": 1009,
    "LeakageError": 1010,
    "Unavailable": 1011,
    "DaemonUnreachable": 1012,
}


def test_every_error_class_keeps_its_documented_code() -> None:
    for class_name, code in STABLE_CODES.items():
        assert getattr(errors, class_name).code == code, class_name


def test_no_two_error_classes_share_a_code_except_the_protocol_base() -> None:
    codes = [getattr(errors, name).code for name in STABLE_CODES]
    assert len(codes) == len(set(codes))


@pytest.mark.parametrize("class_name", sorted(STABLE_CODES))
def test_an_error_comes_back_from_the_wire_as_its_own_class_with_its_data(class_name: str) -> None:
    cls: type[ModelsmithError] = getattr(errors, class_name)
    original = cls("what went wrong", data={"field": "thresholds.composite", "file": "/h/c.toml"})
    wire = msgspec.json.decode(msgspec.json.encode(error_to_wire(original)), type=ErrorObject)
    assert wire.data is not None and wire.data["name"] == cls.name
    again = error_from_wire(wire)
    assert type(again) is cls
    assert again.code == cls.code
    assert again.data == {"field": "thresholds.composite", "file": "/h/c.toml"}


def test_a_foreign_exception_is_an_internal_error_that_hides_its_text() -> None:
    wire = error_to_wire(KeyError("/root/secret"))
    assert wire.code == -32603
    assert "secret" not in wire.message
    assert wire.data == {"name": "internal_error", "type": "KeyError"}


def test_an_unknown_code_from_a_newer_daemon_still_becomes_a_modelsmith_error() -> None:
    error = error_from_wire(ErrorObject(code=1999, message="new", data={"name": "new_thing"}))
    assert type(error) is ModelsmithError
    assert error_class_for_code(1999) is ModelsmithError


def test_a_frame_is_a_big_endian_length_then_the_message() -> None:
    body = msgspec.json.encode(Request(method="daemon.ping", id=1))
    framed = frame(body)
    assert framed[:4] == len(body).to_bytes(4, "big")
    assert frame_length(framed[:4], DEFAULT_MAX_FRAME) == len(body)
    assert msgspec.json.decode(framed[4:], type=IncomingMessage).method == "daemon.ping"


def test_a_header_above_the_limit_is_refused_before_any_body_is_read() -> None:
    with pytest.raises(FrameTooLarge) as caught:
        frame_length((1025).to_bytes(4, "big"), 1024)
    assert (caught.value.size, caught.value.limit) == (1025, 1024)
