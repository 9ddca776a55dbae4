"""Promotion record files: their encoding, and the offline check that they match the ledger.

Every record under ``<cluster>/promotions/`` (request, decision, rollback) is a JSON object
signed by the daemon key (:mod:`modelsmith.loop.records.signing`) and written once. Its ledger entry
names the file (relative to the cluster directory) and the sha256 of its bytes:

    promotion.requested              {file, sha256, ...}
    promotion.approved / .rejected   {decision_file, sha256, ...}
    rollback.done                    {file, sha256, ...}

:func:`verify_cluster_records` is what ``modelsmith ledger verify`` adds to the hash chain: every
record exists, has the bytes the ledger recorded, carries a valid daemon signature, and no record
file is missing from the ledger. It works offline (no daemon), reading the trusted public key
from ``<home>/keys/daemon_ed25519.pub``.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Any

import msgspec

from modelsmith.errors import ModelsmithError
from modelsmith.hashing import sha256_hex
from modelsmith.loop.records.events import (
    LedgerEvent,
    PromotionApproved,
    PromotionRejected,
    PromotionRequested,
    RollbackDone,
    event_from,
)
from modelsmith.loop.records.ledger import LedgerEntry, Recorded
from modelsmith.loop.records.signing import PUBLIC_KEY_NAME, canonical_json, verify_record

__all__ = [
    "PROMOTIONS_DIR",
    "encode_record",
    "read_ledger_events",
    "record_file_of",
    "trusted_daemon_key",
    "verify_cluster_records",
]

PROMOTIONS_DIR = "promotions"

_entry_decoder = msgspec.json.Decoder(LedgerEntry)


def encode_record(record: dict[str, Any]) -> bytes:
    """A signed record's file bytes: canonical JSON (sorted keys), indented for people."""
    return msgspec.json.format(canonical_json(record), indent=2) + b"\n"


def record_file_of(event: LedgerEvent) -> tuple[str, str] | None:
    """``(path relative to the cluster, sha256)`` of the record an event points at, if any."""
    match event:
        case PromotionRequested() | RollbackDone():
            return event.file, event.sha256
        case PromotionApproved() | PromotionRejected():
            return event.decision_file, event.sha256
    return None


def trusted_daemon_key(home: Path) -> str:
    """The daemon's raw Ed25519 public key (base64) from ``<home>/keys/daemon_ed25519.pub``.

    Raises ModelsmithError (NotFound / ValidationError) when it is missing or not Ed25519.
    """
    from modelsmith.errors import NotFound, ValidationError

    path = Path(home) / "keys" / PUBLIC_KEY_NAME
    try:
        fields = path.read_text(encoding="ascii").split()
    except FileNotFoundError:
        raise NotFound(f"no daemon public key at {path}", data={"file": str(path)}) from None
    try:
        if len(fields) < 2 or fields[0] != "ssh-ed25519":
            raise ValueError("not an ssh-ed25519 key")
        blob = base64.b64decode(fields[1], validate=True)
    except (ValueError, binascii.Error) as exc:
        raise ValidationError(f"{path}: {exc}", data={"file": str(path)}) from exc
    # The OpenSSH wire blob ends with the 32 raw key bytes (string "ssh-ed25519", string key).
    return base64.b64encode(blob[-32:]).decode("ascii")


def read_ledger_events(path: Path) -> list[Recorded[LedgerEvent]]:
    """The decodable events of a ledger file, read-only (the chain is verify_file's job)."""
    events: list[Recorded[LedgerEvent]] = []
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return events
    for line in raw.splitlines():
        try:
            entry = _entry_decoder.decode(line)
            events.append(Recorded(entry.seq, entry.ts, event_from(entry.kind, entry.data)))
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
    return events


def verify_cluster_records(cluster_root: Path, trusted_public_key_b64: str | None = None) -> list[str]:
    """Check every promotion, decision and rollback record of a cluster; problems as text.

    An empty list means: each record the ledger names exists, has exactly the recorded sha256,
    is signed by the trusted daemon key, and every ``promotions/*.json`` is named by the ledger.
    ``trusted_public_key_b64`` defaults to the key in ``<cluster_root>/../keys``.
    """
    cluster_root = Path(cluster_root)
    problems: list[str] = []
    entries = read_ledger_events(cluster_root / "ledger.jsonl")
    referenced: set[str] = set()
    key = trusted_public_key_b64
    if key is None and any(record_file_of(e.event) for e in entries):
        try:
            key = trusted_daemon_key(cluster_root.parent)
        except ModelsmithError as exc:
            problems.append(f"cannot check record signatures: {exc.message}")
    for entry in entries:
        pointer = record_file_of(entry.event)
        if pointer is None:
            continue
        relative, recorded_sha256 = pointer
        referenced.add(relative)
        where = f"{relative} (ledger seq {entry.seq}, {entry.event.KIND})"
        path = cluster_root / relative
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            problems.append(f"{where}: record file is missing")
            continue
        if sha256_hex(data) != recorded_sha256:
            problems.append(f"{where}: sha256 does not match the ledger (record altered)")
        try:
            record = json.loads(data)
        except ValueError:
            problems.append(f"{where}: not JSON")
            continue
        if not isinstance(record, dict):
            problems.append(f"{where}: not a JSON object")
            continue
        if key is not None:
            try:
                verify_record(record, key)
            except ModelsmithError as exc:
                problems.append(f"{where}: daemon signature: {exc.message}")
    promotions = cluster_root / PROMOTIONS_DIR
    if promotions.is_dir():
        for path in sorted(promotions.glob("*.json")):
            relative = path.relative_to(cluster_root).as_posix()
            if relative not in referenced:
                problems.append(f"{relative}: record file is not in the ledger")
    return problems
