"""The one place exceptions become wire errors (and wire errors become exceptions again).

The wire's :class:`~modelsmith.rpc.protocol.ErrorObject` is :func:`modelsmith.errors.error_envelope`
laid out as JSON-RPC wants it: ``code`` and ``message`` at the top, the error's ``name`` inside
``data`` (``data.name`` is reserved for it) next to the error-specific detail.
"""

from __future__ import annotations

from typing import Any

from modelsmith.errors import ModelsmithError, error_class_for_code, error_envelope
from modelsmith.rpc.protocol import ErrorObject


def error_to_wire(exc: BaseException) -> ErrorObject:
    """Map any exception to the typed envelope. Foreign exceptions never leak their text."""
    envelope = error_envelope(exc)
    detail = {key: value for key, value in envelope["data"].items() if key != "name"}
    data: dict[str, Any] = {"name": envelope["name"], **detail}
    return ErrorObject(code=envelope["code"], message=envelope["message"], data=data)


def error_from_wire(error: ErrorObject) -> ModelsmithError:
    """The typed error of an envelope: the exact class of its code (the root for an unknown one)."""
    cls = error_class_for_code(error.code)
    data = dict(error.data or {})
    data.pop("name", None)
    return cls(error.message, data=data)
