"""The cluster ledger: an append-only, hash-chained, fsynced event log (``<cluster>/ledger.jsonl``).

Each line is one :class:`LedgerEntry` encoded as canonical JSON (msgspec, sorted keys, no
whitespace) and terminated by ``\\n``:

- ``seq`` counts from 0, one per line;
- ``prev`` is the sha256 (hex) of the previous entry's line bytes (without its newline), or
  ``"0" * 64`` for the first entry, so every entry commits to the exact bytes before it;
- ``hash`` is the sha256 (hex) of the canonical encoding of the entry without ``hash``.

The ledger is the source of truth of a cluster; everything else can be rebuilt or checked
against it. :meth:`Ledger.open` verifies the whole chain. A torn last line (an append that a
crash interrupted: no trailing newline, undecodable, or a bad hash) is cut off and reported as a
:class:`RecoveryNote`; damage anywhere else raises :class:`~modelsmith.errors.LedgerCorrupt`
naming the entry. :func:`verify_file` runs the same check read-only.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import msgspec
import structlog

from modelsmith.atomic import fsync_dir
from modelsmith.clock import utc_stamp
from modelsmith.errors import LedgerCorrupt, NotFound, Unavailable, ValidationError
from modelsmith.hashing import sha256_hex as _sha256_hex
from modelsmith.loop.records.events import LedgerEvent, event_data, event_from

__all__ = [
    "GENESIS_PREV",
    "Ledger",
    "LedgerEntry",
    "Recorded",
    "RecoveryNote",
    "VerifyReport",
    "verify_file",
]

GENESIS_PREV = "0" * 64

_log = structlog.get_logger(__name__)


class LedgerEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One ledger event, exactly as it is stored on its line."""

    seq: int
    ts: str
    kind: str
    data: dict[str, Any]
    prev: str
    hash: str


class _EntryBody(msgspec.Struct, frozen=True):
    """The part of an entry that its ``hash`` covers (everything but ``hash``)."""

    seq: int
    ts: str
    kind: str
    data: dict[str, Any]
    prev: str


class RecoveryNote(msgspec.Struct, frozen=True):
    """What was cut off the end of a ledger: the remains of an interrupted append."""

    file: str
    seq: int  # the seq the torn entry would have had
    offset: int  # byte length of the ledger that was kept
    dropped_bytes: int
    reason: str  # "no_newline" | "undecodable" | "bad_hash" | "not_canonical"


class VerifyReport(msgspec.Struct, frozen=True):
    """Outcome of :func:`verify_file`: ``ok`` unless some entry other than a torn tail is bad."""

    file: str
    ok: bool
    entries: int  # intact entries before the first problem
    last_seq: int | None
    last_hash: str | None
    torn_tail: RecoveryNote | None = None
    problem: dict[str, Any] | None = None  # the LedgerCorrupt data: file, line, seq, reason


_encoder = msgspec.json.Encoder(order="sorted")
_entry_decoder = msgspec.json.Decoder(LedgerEntry)


E = TypeVar("E", bound=LedgerEvent)  # type: ignore[misc]


@dataclass(frozen=True, slots=True)
class Recorded(Generic[E]):
    """One ledger entry as readers see it: its place, its time and its typed event."""

    seq: int
    ts: str
    event: E


def _entry_hash(entry: LedgerEntry | _EntryBody) -> str:
    body = _EntryBody(entry.seq, entry.ts, entry.kind, entry.data, entry.prev)
    return _sha256_hex(_encoder.encode(body))


class _LineDamage(Exception):
    """Internal: why one line does not verify (a slug for ``reason``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _check_line(line: bytes, expected_seq: int, expected_prev: str) -> LedgerEntry:
    """Decode and verify one line; raise _LineDamage with a stable reason if it is bad."""
    try:
        entry = _entry_decoder.decode(line)
    except msgspec.DecodeError as exc:
        raise _LineDamage("undecodable") from exc
    if entry.hash != _entry_hash(entry):
        raise _LineDamage("bad_hash")
    # The hash only covers the decoded values; the next entry's ``prev`` covers the bytes, so the
    # bytes must be the one canonical form or a whitespace edit of the last line would go unseen.
    if _encoder.encode(entry) != line:
        raise _LineDamage("not_canonical")
    if entry.seq != expected_seq:
        raise _LineDamage("bad_seq")
    if entry.prev != expected_prev:
        raise _LineDamage("bad_prev")
    return entry


# Damage on the last line that an interrupted append can leave behind. A complete, well-hashed
# line that points at the wrong predecessor cannot come from a crash, so it stays corruption.
_TORN_REASONS = frozenset({"no_newline", "undecodable", "bad_hash", "not_canonical"})


def _holds_whole_entry(tail: bytes, seq: int, prev: str) -> bool:
    """Whether a proper prefix of ``tail`` is itself a valid entry ``seq``.

    ``ts`` sorts last and ends in "Z", so every canonical line ends with ``Z"}``: only those
    few places need a try.
    """
    end = tail.find(b'Z"}')
    while end != -1 and end + 3 < len(tail):
        try:
            _check_line(tail[: end + 3], seq, prev)
        except _LineDamage:
            end = tail.find(b'Z"}', end + 1)
            continue
        return True
    return False


def _decode_event(entry: LedgerEntry, file: str) -> Recorded[LedgerEvent]:
    """The typed event of a verified entry; an entry that is none of ours is corruption."""
    try:
        event = event_from(entry.kind, entry.data)
    except msgspec.ValidationError as exc:
        raise LedgerCorrupt(
            f"ledger {file} is corrupt at line {entry.seq + 1} (seq {entry.seq}): "
            f"bad_event: {entry.kind}: {exc}",
            data={"file": file, "line": entry.seq + 1, "seq": entry.seq, "reason": "bad_event",
                  "kind": entry.kind},
        ) from None
    return Recorded(entry.seq, entry.ts, event)


@dataclass
class _Scan:
    entries: list[LedgerEntry]
    events: list[Recorded[LedgerEvent]]
    kept_length: int  # bytes of the file that hold intact entries
    last_line_hash: str  # sha256 of the last intact line, i.e. the next entry's prev
    torn: RecoveryNote | None


def _scan(raw: bytes, file: str) -> _Scan:
    """Verify the chain in ``raw``; raise LedgerCorrupt for damage other than a torn tail."""
    entries: list[LedgerEntry] = []
    events: list[Recorded[LedgerEvent]] = []
    prev = GENESIS_PREV
    offset = 0
    total = len(raw)
    while offset < total:
        newline = raw.find(b"\n", offset)
        is_last = newline == -1 or newline == total - 1
        end = total if newline == -1 else newline
        line = raw[offset:end]
        seq = len(entries)
        try:
            if newline == -1:
                raise _LineDamage("no_newline")
            if not line:
                raise _LineDamage("blank_line")
            entry = _check_line(line, seq, prev)
        except _LineDamage as damage:
            reason = damage.reason
            if is_last and reason in _TORN_REASONS:
                if not _holds_whole_entry(line, seq, prev):
                    torn = RecoveryNote(
                        file=file,
                        seq=seq,
                        offset=offset,
                        dropped_bytes=total - offset,
                        reason=reason,
                    )
                    return _Scan(entries, events, offset, prev, torn)
                # A crash tears at most the one line being appended, so a tail that starts with
                # a whole valid entry and goes on lost a line end to damage, not to a crash.
                reason = "damaged_line_end"
            raise LedgerCorrupt(
                f"ledger {file} is corrupt at line {seq + 1} (seq {seq}): {reason}",
                data={"file": file, "line": seq + 1, "seq": seq, "reason": reason},
            ) from None
        entries.append(entry)
        events.append(_decode_event(entry, file))
        prev = _sha256_hex(line)
        offset = end + 1
    return _Scan(entries, events, offset, prev, None)


def verify_file(path: Path) -> VerifyReport:
    """Check a ledger file without changing it (``modelsmith ledger verify``).

    A torn last line is reported in ``torn_tail`` and leaves ``ok`` true (opening the ledger
    repairs it); any other damage gives ``ok`` false and names the entry in ``problem``.
    Raises NotFound when there is no such file.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"no ledger at {path}", data={"file": str(path)}) from None
    try:
        scan = _scan(raw, str(path))
    except LedgerCorrupt as exc:
        intact = int(exc.data["seq"])
        return VerifyReport(
            file=str(path),
            ok=False,
            entries=intact,
            last_seq=intact - 1 if intact else None,
            last_hash=None,
            problem=dict(exc.data),
        )
    last = scan.entries[-1] if scan.entries else None
    return VerifyReport(
        file=str(path),
        ok=True,
        entries=len(scan.entries),
        last_seq=last.seq if last else None,
        last_hash=last.hash if last else None,
        torn_tail=scan.torn,
    )


class Ledger:
    """An open ledger: verified on open, appended to durably, indexed in memory.

    One process owns a ledger file. :meth:`append` is synchronous and thread-safe; the daemon
    calls it from a worker thread (``anyio.to_thread.run_sync``) so the fsync never blocks the
    event loop. Readers (:meth:`recorded`, :meth:`find`, :meth:`last_of` ...) see only entries
    whose append has returned, as typed events.

    ``on_append`` (set by the cluster runtime) is called under the ledger's lock with every new
    entry, in order: the cluster state is reduced from exactly the events on disk.
    """

    def __init__(self, path: Path, scan: _Scan) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._entries: list[LedgerEntry] = scan.entries
        self._events: list[Recorded[LedgerEvent]] = scan.events
        self._by_kind: dict[type[Any], list[Recorded[Any]]] = {}
        for recorded in scan.events:
            self._by_kind.setdefault(type(recorded.event), []).append(recorded)
        self._size = scan.kept_length
        self._next_prev = scan.last_line_hash
        self.recovery: RecoveryNote | None = scan.torn
        """The torn tail cut off when this ledger was opened, if any."""
        self.on_append: Callable[[Recorded[LedgerEvent]], None] | None = None

    @classmethod
    def open(cls, path: Path, *, create: bool = True) -> Ledger:
        """Open and verify the ledger at ``path`` (creating it when absent and ``create``).

        A torn last line is truncated away (durably) and recorded in :attr:`recovery` with a
        warning in the log. Raises LedgerCorrupt, naming the entry, for any other damage.
        """
        path = Path(path)
        created = not path.exists()
        if created and not create:
            raise NotFound(f"no ledger at {path}", data={"file": str(path)})
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab+") as handle:
            handle.seek(0)
            raw = handle.read()
            scan = _scan(raw, str(path))
            if scan.torn is not None:
                handle.truncate(scan.kept_length)
                handle.flush()
                os.fsync(handle.fileno())
                _log.warning(
                    "ledger.torn_tail_removed",
                    file=str(path),
                    seq=scan.torn.seq,
                    dropped_bytes=scan.torn.dropped_bytes,
                    reason=scan.torn.reason,
                )
        if created:
            fsync_dir(path.parent)
        return cls(path, scan)

    @property
    def path(self) -> Path:
        return self._path

    def append(self, event: E) -> Recorded[E]:
        """Append one event and return it once it is on disk (written, flushed and fsynced).

        Raises ValidationError for an event that does not survive a JSON round trip (a NaN
        score, say): what is on disk is always what readers get back.
        """
        kind, data = event_data(event)
        with self._lock:
            body = _EntryBody(len(self._entries), utc_stamp(precision="microseconds"), kind, data,
                              self._next_prev)
            try:
                body_bytes = _encoder.encode(body)
            except (TypeError, ValueError, OverflowError) as exc:
                raise ValidationError(
                    f"ledger data for {kind!r} cannot be encoded as JSON: {exc}",
                    data={"field": "data", "kind": kind},
                ) from exc
            entry = LedgerEntry(
                body.seq, body.ts, kind, data, body.prev, _sha256_hex(body_bytes)
            )
            line = _encoder.encode(entry)
            # Keep in memory what a reopen will read: the decoded bytes, not the caller's objects.
            try:
                stored = _entry_decoder.decode(line)
                again = event_from(stored.kind, stored.data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                stored = None
            if stored is None or stored.hash != _entry_hash(stored) or again != event:
                raise ValidationError(
                    f"ledger data for {kind!r} does not survive a JSON round trip",
                    data={"field": "data", "kind": kind},
                )
            self._write_durably(line + b"\n")
            recorded: Recorded[E] = Recorded(stored.seq, stored.ts, event)
            self._entries.append(stored)
            self._events.append(recorded)  # type: ignore[arg-type]
            self._by_kind.setdefault(type(event), []).append(recorded)
            self._next_prev = _sha256_hex(line)
            if self.on_append is not None:
                self.on_append(recorded)  # type: ignore[arg-type]
            return recorded

    def _write_durably(self, payload: bytes) -> None:
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND)
        try:
            try:
                written = os.write(fd, payload)
                if written != len(payload):
                    raise OSError(f"short write to ledger: {written} of {len(payload)} bytes")
                os.fsync(fd)
            except BaseException:
                # Never leave a partial line for the next append to build on.
                os.ftruncate(fd, self._size)
                os.fsync(fd)
                raise
        except OSError as exc:
            raise Unavailable(
                f"could not append to ledger {self._path}: {exc}",
                data={"file": str(self._path)},
            ) from exc
        finally:
            os.close(fd)
        self._size += len(payload)

    def entries(self, since: int = 0) -> list[LedgerEntry]:
        """The stored entries with ``seq >= since``, oldest first (a copy): for verification and
        export; readers of the domain use :meth:`recorded`."""
        with self._lock:
            return self._entries[max(since, 0) :]

    def recorded(self, since: int = 0) -> list[Recorded[LedgerEvent]]:
        """The typed events with ``seq >= since``, oldest first (a copy)."""
        with self._lock:
            return self._events[max(since, 0) :]

    def replay(self, apply: Callable[[Recorded[LedgerEvent]], None]) -> None:
        """Call ``apply`` with every event in order, then with every later append (under the
        lock, so none is missed or seen twice)."""
        with self._lock:
            for recorded in self._events:
                apply(recorded)
            self.on_append = apply

    @property
    def last(self) -> LedgerEntry | None:
        """The newest entry, or None for an empty ledger."""
        with self._lock:
            return self._entries[-1] if self._entries else None

    def find(self, kind: type[E]) -> list[Recorded[E]]:
        """All events of one kind, oldest first (a copy)."""
        with self._lock:
            return list(self._by_kind.get(kind, ()))

    def last_of(self, kind: type[E]) -> Recorded[E] | None:
        """The newest event of one kind, or None."""
        with self._lock:
            found = self._by_kind.get(kind)
            return found[-1] if found else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
