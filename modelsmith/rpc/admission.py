"""Admission of connections: caps in total and per uid, and riding out fd exhaustion on accept.

- :class:`ConnectionCaps` counts admitted connections; one over a cap is answered with one
  ``Unavailable`` (1011) frame naming the cap (``data.reason = "too_many_connections"``,
  ``data.scope`` = ``total`` or ``uid``, ``data.limit``) and closed.
- The total cap never exceeds what the process's ``RLIMIT_NOFILE`` leaves after
  :func:`fd_reserve` descriptors kept for the daemon's own files (ledgers, logs, engines), so
  clients alone can not exhaust the descriptors (:func:`effective_total_cap`).
- When ``accept()`` fails with EMFILE/ENFILE anyway (other work holds descriptors),
  :class:`AcceptBackoff` sleeps a bounded, growing time and logs once per burst, and the server
  goes on accepting.
"""

from __future__ import annotations

import errno
import resource
from collections import Counter
from dataclasses import dataclass, field

import structlog

from modelsmith.errors import Unavailable

__all__ = [
    "RESOURCE_ERRNOS",
    "AcceptBackoff",
    "ConnectionCaps",
    "effective_total_cap",
    "fd_reserve",
]

log = structlog.get_logger("modelsmith.rpc")

# accept() errors that mean "no resources right now", not "the listener is broken".
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def fd_reserve(soft_limit: int) -> int:
    """Descriptors kept back from clients: a quarter of the limit, at least 64."""
    return max(64, soft_limit // 4)


def effective_total_cap(configured: int) -> int:
    """``configured``, lowered so that admitted clients leave :func:`fd_reserve` descriptors."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, soft - fd_reserve(soft)))


@dataclass
class ConnectionCaps:
    """Counts of admitted connections, in total and per peer uid."""

    max_total: int
    max_per_uid: int
    total: int = 0
    per_uid: Counter[int] = field(default_factory=Counter)
    refused: int = 0

    def admit(self, uid: int) -> Unavailable | None:
        """Count a new connection of ``uid`` in, or return the refusal to send it."""
        if self.total >= self.max_total:
            return self._refuse("total", self.max_total, uid)
        if self.per_uid[uid] >= self.max_per_uid:
            return self._refuse("uid", self.max_per_uid, uid)
        self.total += 1
        self.per_uid[uid] += 1
        return None

    def release(self, uid: int) -> None:
        self.total -= 1
        self.per_uid[uid] -= 1
        if self.per_uid[uid] <= 0:
            del self.per_uid[uid]

    def _refuse(self, scope: str, limit: int, uid: int) -> Unavailable:
        if self.refused == 0 or self.refused % 1000 == 0:
            log.warning("connection refused: cap reached", scope=scope, limit=limit, uid=uid,
                        refused_so_far=self.refused)
        self.refused += 1
        setting = "max_connections" if scope == "total" else "max_connections_per_uid"
        return Unavailable(
            f"too many connections ({setting} = {limit}); close some and retry",
            data={"reason": "too_many_connections", "scope": scope, "limit": limit, "setting": setting},
        )


@dataclass
class AcceptBackoff:
    """Bounded, growing sleeps while ``accept()`` has no descriptors; one log line per burst."""

    initial_s: float = 0.01
    max_s: float = 0.5
    _next_s: float = 0.0
    _failures: int = 0

    def failed(self, exc: OSError) -> float:
        """Record a resource failure; returns how long to sleep before accepting again."""
        if self._failures == 0:
            log.error("accept failed: out of resources; backing off", errno=exc.errno,
                      error=exc.strerror)
            self._next_s = self.initial_s
        self._failures += 1
        delay = self._next_s
        self._next_s = min(self._next_s * 2, self.max_s)
        return delay

    def succeeded(self) -> None:
        if self._failures:
            log.info("accept recovered", failed_attempts=self._failures)
            self._failures = 0
