"""The one place exceptions become wire errors (and wire errors become exceptions again)."""

from __future__ import annotations

from typing import Any

from modelsmith.errors import InternalError, ModelsmithError, error_class_for_code
from modelsmith.rpc.protocol import ErrorObject


def error_to_wire(exc: BaseException) -> ErrorObject:
    """Map any exception to the typed envelope. Foreign exceptions never leak their text."""
    if isinstance(exc, ModelsmithError):
        data: dict[str, Any] = {"name": exc.name, **exc.data}
        return ErrorObject(code=exc.code, message=exc.message, data=data)
    return ErrorObject(
        code=InternalError.code,
        message="internal error; see the daemon log",
        data={"name": InternalError.name, "type": type(exc).__name__},
    )


def error_from_wire(error: ErrorObject) -> ModelsmithError:
    cls = error_class_for_code(error.code)
    data = dict(error.data or {})
    data.pop("name", None)
    return cls(error.message, data=data)
