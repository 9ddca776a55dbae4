"""What every rubric criterion has: the base Struct of the tagged union and its load-time error.

The criteria themselves live in :mod:`modelsmith.loop.scoring.criteria` (the classic kinds),
:mod:`modelsmith.loop.scoring.similarity` (``similarity``) and
:mod:`modelsmith.loop.scoring.judges` (``label``, ``rubric_judge``); this module is what they all
import, so none of them imports another to find its base.
"""

from __future__ import annotations

import math
import string
from collections.abc import Collection
from typing import Annotated, ClassVar, Literal

from msgspec import Meta, Struct

__all__ = [
    "Count",
    "CriterionBase",
    "InvalidField",
    "NonEmptyText",
    "NonNegative",
    "Weight",
    "check_template",
]

Weight = Annotated[float, Meta(gt=0)]
NonNegative = Annotated[float, Meta(ge=0)]
Count = Annotated[int, Meta(ge=0)]
NonEmptyText = Annotated[str, Meta(min_length=1)]


class InvalidField(ValueError):
    """A criterion or scenario option that cannot work; ``field`` is relative to the object."""

    def __init__(self, kind: str, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.kind = kind
        self.field = field
        self.problem = message


class CriterionBase(
    Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, tag_field="type"
):
    """Fields every criterion has. ``weight`` counts in the weighted mean of the rubric."""

    weight: Weight = 1.0
    name: str | None = None
    #: what the criterion's credit counts towards; None: its kind's default (see counts_as_of)
    counts_as: Literal["format", "substance"] | None = None

    #: the criterion's ``type`` tag, readable without msgspec introspection
    kind: ClassVar[str] = ""

    def __post_init__(self) -> None:
        if not math.isfinite(self.weight):
            raise InvalidField("bad_weight", "weight", "must be a finite number > 0")
        self._check()

    def _check(self) -> None:
        """Per-type load-time checks; raise InvalidField."""

    def needs_reference(self) -> bool:
        """True when scoring compares against the scenario's ``reference``."""
        return False

    @property
    def label(self) -> str:
        """The name results carry: ``name`` if given, otherwise the criterion type."""
        return self.name if self.name else self.kind


def check_template(template: str, allowed: Collection[str], *, field: str = "template",
                   required: Collection[str] = ("response",)) -> set[str]:
    """The placeholders of a ``str.format`` template, each one of ``allowed`` (no attribute,
    index, format spec or conversion: formatting can never reach into objects). Raises
    InvalidField naming ``field``; returns the names used."""
    names: set[str] = set()
    try:
        for _, field_name, format_spec, conversion in string.Formatter().parse(template):
            if field_name is None:
                continue
            if field_name not in allowed or format_spec or conversion:
                raise InvalidField(
                    "invalid_value",
                    field,
                    f"unknown placeholder {{{field_name}}}; use "
                    + ", ".join(f"{{{name}}}" for name in sorted(allowed))
                    + " (double literal braces: {{ }})",
                )
            names.add(field_name)
    except ValueError as exc:
        if isinstance(exc, InvalidField):
            raise
        raise InvalidField("invalid_value", field, f"bad braces: {exc}") from exc
    for name in required:
        if name not in names:
            raise InvalidField("invalid_value", field, f"must contain {{{name}}}")
    return names
