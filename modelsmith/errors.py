"""The one error root of Modelsmith, with stable codes.

Every error that can reach a client is a :class:`ModelsmithError`; its ``code`` is the contract,
its message is for people. Every error that crosses a boundary (the wire, the ledger, MCP, the
CLI's JSON) is shaped by one function, :func:`error_envelope`; the rpc layer's
:func:`modelsmith.rpc.errors.error_to_wire` derives from it. Foreign exceptions are wrapped where
they enter. Each code is declared by exactly one class (:func:`error_class_for_code`).

This module imports only the standard library: the CLI uses it on its hot path.

Exception tree::

    ModelsmithError                     1000  the root; also what an unknown code reads back as
    ├── ProtocolError                  JSON-RPC's own codes (a family: reads back as InvalidRequest)
    │   ├── ParseError                 -32700  bytes that are not a JSON-RPC message
    │   ├── InvalidRequest             -32600  a message that is not a valid request
    │   ├── MethodNotFound             -32601
    │   ├── InvalidParams              -32602  params of the wrong shape, unknown fields
    │   └── InternalError              -32603  a bug; the traceback stays in the daemon's log
    ├── NotFound                        1001  no such cluster, job, eval tag, request ...
    ├── ValidationError                 1002  a user-written file or value is bad (names where)
    ├── ConflictError                   1003  illegal in the current state (busy, transition)
    ├── PermissionDenied                1004  peer credentials or policy forbid it
    ├── GateFailed                      1005  the promotion policy gate did not pass
    ├── SignatureError                  1006  a signature or signed record does not verify
    ├── EngineError                     1007  an inference engine failed or is not ready
    ├── TrainerError                    1008  the trainer process failed
    ├── LedgerCorrupt                   1009  a ledger does not verify
    ├── LeakageError                    1010  held-out data would reach training
    ├── Unavailable                     1011  the daemon is shutting down or a resource is gone
    └── DaemonUnreachable               1012  client side only: no daemon at the socket
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar


class ModelsmithError(Exception):
    """Root of every error Modelsmith reports. ``code`` is stable; ``data`` is JSON-able detail."""

    code: ClassVar[int] = 1000
    name: ClassVar[str] = "error"

    def __init__(self, message: str, *, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.data: dict[str, Any] = data or {}

    def __str__(self) -> str:
        return self.message


class ProtocolError(ModelsmithError):
    code = -32600
    name = "protocol_error"


class ParseError(ProtocolError):
    code = -32700
    name = "parse_error"


class InvalidRequest(ProtocolError):
    code = -32600
    name = "invalid_request"


class MethodNotFound(ProtocolError):
    code = -32601
    name = "method_not_found"


class InvalidParams(ProtocolError):
    code = -32602
    name = "invalid_params"


class InternalError(ProtocolError):
    code = -32603
    name = "internal_error"


class NotFound(ModelsmithError):
    code = 1001
    name = "not_found"


class ValidationError(ModelsmithError):
    code = 1002
    name = "validation_error"


class ConflictError(ModelsmithError):
    code = 1003
    name = "conflict"


class PermissionDenied(ModelsmithError):
    code = 1004
    name = "permission_denied"


class GateFailed(ModelsmithError):
    code = 1005
    name = "gate_failed"


class SignatureError(ModelsmithError):
    code = 1006
    name = "signature_error"


class EngineError(ModelsmithError):
    code = 1007
    name = "engine_error"


class TrainerError(ModelsmithError):
    code = 1008
    name = "trainer_error"


class LedgerCorrupt(ModelsmithError):
    code = 1009
    name = "ledger_corrupt"


class LeakageError(ModelsmithError):
    code = 1010
    name = "leakage"


class Unavailable(ModelsmithError):
    code = 1011
    name = "unavailable"


class DaemonUnreachable(ModelsmithError):
    code = 1012
    name = "daemon_unreachable"


def _error_classes() -> list[type[ModelsmithError]]:
    """Every class of the tree that exists now, the root first."""
    seen: list[type[ModelsmithError]] = []
    stack: list[type[ModelsmithError]] = [ModelsmithError]
    while stack:
        cls = stack.pop()
        seen.append(cls)
        stack.extend(reversed(cls.__subclasses__()))
    return seen


def registered_codes(classes: Iterable[type[ModelsmithError]]) -> dict[int, type[ModelsmithError]]:
    """Code -> the one class that declares it.

    A class registers its code by declaring ``code`` in its own body; a subclass that only renames
    (say ``IllegalTransition(ConflictError)``) travels as its parent's code. ``ProtocolError`` is
    the family of JSON-RPC's codes, not a code of its own: it reads back as ``InvalidRequest``.
    Two classes declaring one code is a bug: :class:`RuntimeError` names both.
    """
    table: dict[int, type[ModelsmithError]] = {}
    for cls in classes:
        if "code" not in vars(cls) or cls is ProtocolError:
            continue
        other = table.setdefault(cls.code, cls)
        if other is not cls:
            raise RuntimeError(f"error code {cls.code} is declared by both {other.__name__} and {cls.__name__}")
    return table


# Built once, from the tree drawn in the module docstring.
_CLASS_FOR_CODE: dict[int, type[ModelsmithError]] = registered_codes(_error_classes())


def error_class_for_code(code: int) -> type[ModelsmithError]:
    """The exact class that declares ``code`` (clients rebuild typed errors with it).

    An unknown code (from a newer daemon, say) gives the root :class:`ModelsmithError`.
    """
    return _CLASS_FOR_CODE.get(code, ModelsmithError)


def error_envelope(exc: BaseException) -> dict[str, Any]:
    """The one error shape that crosses a boundary (wire, ledger, MCP, CLI JSON).

    ``{"code", "name", "message", "data"}``. A foreign exception never leaks its text: it becomes
    an internal error naming only its type (its traceback stays in the daemon's log).
    """
    if isinstance(exc, ModelsmithError):
        return {"code": exc.code, "name": exc.name, "message": exc.message, "data": dict(exc.data)}
    return {
        "code": InternalError.code,
        "name": InternalError.name,
        "message": "internal error; see the daemon log",
        "data": {"type": type(exc).__name__},
    }
