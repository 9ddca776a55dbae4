"""Reading a user-written TOML file into a pydantic model, with errors that name file and field."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, TypeVar

import pydantic

from modelsmith.errors import ValidationError

M = TypeVar("M", bound=pydantic.BaseModel)


def _field_path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc)


def load_toml_model(path: Path, model: type[M], *, extra: dict[str, Any] | None = None) -> M:
    """Parse ``path`` as TOML and validate it as ``model``.

    Raises ValidationError whose data has ``file``, ``field`` (a dotted path, or None for a
    syntax or read error) and, for validation errors, every problem under ``errors``. ``extra``
    is merged into the error data (e.g. the cluster's name).
    """
    base = {"file": str(path), **(extra or {})}
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ValidationError(f"{path}: not valid TOML: {exc}", data={**base, "field": None}) from exc
    except OSError as exc:
        raise ValidationError(f"{path}: cannot read: {exc.strerror}", data={**base, "field": None}) from exc
    try:
        return model.model_validate(raw)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        field = _field_path(first["loc"])
        raise ValidationError(
            f"{path}: field {field!r}: {first['msg']}",
            data={**base, "field": field,
                  "errors": [{"field": _field_path(e["loc"]), "message": e["msg"]} for e in exc.errors()]},
        ) from exc
