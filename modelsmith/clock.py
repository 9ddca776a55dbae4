"""The one UTC clock: RFC 3339 timestamps with a ``Z``. Standard library only."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

__all__ = ["utc_now", "utc_stamp"]


def utc_now() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


def utc_stamp(moment: datetime | None = None, *,
              precision: Literal["seconds", "microseconds"] = "seconds") -> str:
    """``moment`` (default: now) as RFC 3339 in UTC, e.g. ``2026-12-01T20:03:31Z``.

    The ledger uses ``precision="microseconds"`` (``...31.123456Z``): its format is part of the
    hash-chained bytes and never changes.
    """
    moment = (moment or utc_now()).astimezone(UTC)
    if precision == "microseconds":
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
