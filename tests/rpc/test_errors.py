"""The error contract: stable codes, and errors that survive the trip over the wire typed."""

from __future__ import annotations

import msgspec
import pytest

from modelsmith import errors
from modelsmith.errors import (
    InvalidRequest,
    ModelsmithError,
    ProtocolError,
    error_class_for_code,
    error_envelope,
)
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


def every_declared_class() -> list[type[ModelsmithError]]:
    """The classes of modelsmith/errors.py that declare a code, the root included."""
    return [cls for cls in vars(errors).values()
            if isinstance(cls, type) and issubclass(cls, ModelsmithError)
            and cls is not ProtocolError]


def test_the_documented_codes_are_all_the_declared_ones() -> None:
    declared = {cls.__name__ for cls in every_declared_class()} - {"ModelsmithError"}
    assert declared == set(STABLE_CODES)


@pytest.mark.parametrize("cls", every_declared_class(), ids=lambda cls: cls.__name__)
def test_an_error_comes_back_from_the_wire_as_its_own_class_name_and_data(
    cls: type[ModelsmithError],
) -> None:
    detail = {"field": "thresholds.composite", "file": "/h/c.toml", "limits": [1, 2]}
    original = cls("what went wrong", data=detail)
    envelope = error_envelope(original)
    wire = msgspec.json.decode(msgspec.json.encode(error_to_wire(original)), type=ErrorObject)
    assert (wire.code, wire.message) == (envelope["code"], envelope["message"])
    assert wire.data == {"name": envelope["name"], **envelope["data"]}
    again = error_from_wire(wire)
    assert type(again) is cls
    assert (again.code, again.name, again.message) == (cls.code, cls.name, "what went wrong")
    assert again.data == detail
    assert error_envelope(again) == envelope


def test_a_protocol_error_reads_back_as_invalid_request_with_the_same_code() -> None:
    again = error_from_wire(error_to_wire(ProtocolError("the daemon answered without an id")))
    assert type(again) is InvalidRequest
    assert again.code == ProtocolError.code


def test_the_name_on_the_wire_is_the_errors_own_even_if_its_data_has_one() -> None:
    wire = error_to_wire(errors.NotFound("gone", data={"name": "job-7", "job_id": "7"}))
    assert wire.data == {"name": "not_found", "job_id": "7"}


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
