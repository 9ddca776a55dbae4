"""The daemon's Ed25519 signing key and signed records.

The daemon signs what it asserts (promotion requests, promotion records) with one key kept at
``<home>/keys/daemon_ed25519`` (PEM, PKCS#8, mode 0600, in a 0700 directory) next to its
``daemon_ed25519.pub`` (OpenSSH format, so ``ssh-keygen -lf`` prints the same ``key_id``).

A signed record is a JSON object whose ``signature`` field holds
``{"alg": "ed25519", "key_id", "public_key", "value"}``; the signature covers the canonical JSON
(:func:`canonical_json`) of the record without that field.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from pathlib import Path
from typing import Any

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from modelsmith.atomic import atomic_write_bytes, create_exclusive
from modelsmith.errors import PermissionDenied, SignatureError, ValidationError

__all__ = [
    "PRIVATE_KEY_NAME",
    "PUBLIC_KEY_NAME",
    "SIGNATURE_ALG",
    "DaemonKey",
    "canonical_json",
    "key_id_of",
    "verify_record",
    "verify_signature",
]

PRIVATE_KEY_NAME = "daemon_ed25519"
PUBLIC_KEY_NAME = "daemon_ed25519.pub"
SIGNATURE_ALG = "ed25519"
_PUBLIC_KEY_COMMENT = "modelsmith-daemon"

_canonical_encoder = msgspec.json.Encoder(order="sorted")


def canonical_json(obj: Any) -> bytes:
    """The one canonical JSON encoding of ``obj``: msgspec, sorted keys, no whitespace.

    Raises ValidationError for values JSON cannot hold.
    """
    try:
        return _canonical_encoder.encode(obj)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValidationError(f"value cannot be encoded as canonical JSON: {exc}") from exc


def _public_key_from_b64(public_key_b64: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(public_key_b64, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise SignatureError(
            "public key is not a base64 Ed25519 key", data={"reason": "malformed"}
        ) from exc


def key_id_of(public_key_b64: str) -> str:
    """The ``SHA256:...`` fingerprint of a raw Ed25519 public key, as ``ssh-keygen -l`` prints it."""
    public_key = _public_key_from_b64(public_key_b64)
    openssh = public_key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    wire_blob = base64.b64decode(openssh.split()[1])
    digest = hashlib.sha256(wire_blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def verify_signature(payload: bytes, signature_b64: str, public_key_b64: str) -> None:
    """Check an Ed25519 signature (base64) over ``payload``; raise SignatureError if it fails.

    ``data["reason"]`` is ``"malformed"`` for undecodable input, ``"bad_signature"`` otherwise.
    """
    public_key = _public_key_from_b64(public_key_b64)
    try:
        signature = base64.b64decode(signature_b64, validate=True)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise SignatureError(
            "signature is not base64", data={"reason": "malformed"}
        ) from exc
    try:
        public_key.verify(signature, payload)
    except InvalidSignature:
        raise SignatureError(
            "signature does not verify", data={"reason": "bad_signature"}
        ) from None


def _record_payload(record: dict[str, Any]) -> bytes:
    unsigned = {key: value for key, value in record.items() if key != "signature"}
    return canonical_json(unsigned)


def verify_record(record: dict[str, Any], public_key_b64: str) -> None:
    """Check a signed record against the trusted daemon key ``public_key_b64``.

    Raises SignatureError: ``reason`` is ``"malformed"`` (no or bad signature block),
    ``"unknown_signer"`` (signed by another key) or ``"bad_signature"`` (changed after signing).
    """
    block = record.get("signature")
    if not isinstance(block, dict):
        raise SignatureError("record carries no signature", data={"reason": "malformed"})
    value = block.get("value")
    embedded_key = block.get("public_key")
    if (
        block.get("alg") != SIGNATURE_ALG
        or not isinstance(value, str)
        or not isinstance(embedded_key, str)
    ):
        raise SignatureError(
            "record signature block is malformed", data={"reason": "malformed"}
        )
    if embedded_key != public_key_b64 or block.get("key_id") != key_id_of(public_key_b64):
        raise SignatureError(
            "record is signed by a key other than the trusted daemon key",
            data={"reason": "unknown_signer", "key_id": block.get("key_id")},
        )
    verify_signature(_record_payload(record), value, public_key_b64)


class DaemonKey:
    """The daemon's Ed25519 private key; create or load it with :meth:`load_or_create`."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        raw_public = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.public_key_b64: str = base64.b64encode(raw_public).decode("ascii")
        """The raw 32-byte public key, base64: what records embed and verifiers trust."""
        self.key_id: str = key_id_of(self.public_key_b64)
        """The ``SHA256:...`` fingerprint of the public key."""

    @classmethod
    def load_or_create(cls, keys_dir: Path) -> DaemonKey:
        """Load the key in ``keys_dir``, creating it (and the 0700 directory) on first start.

        Creation is exclusive, so two daemons starting at once end up with the same key.
        Raises PermissionDenied when the private key file is readable by group or others.
        """
        keys_dir = Path(keys_dir)
        if not keys_dir.is_dir():
            keys_dir.mkdir(parents=True, mode=0o700, exist_ok=True)
            os.chmod(keys_dir, 0o700)  # mkdir's mode is filtered by the umask
        private_path = keys_dir / PRIVATE_KEY_NAME
        if not private_path.exists():
            fresh = Ed25519PrivateKey.generate()
            pem = fresh.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            try:
                create_exclusive(private_path, pem, mode=0o600)
            except FileExistsError:
                pass  # another start won the race: use its key
        key = cls(cls._load_private(private_path))
        key._write_public_key(keys_dir / PUBLIC_KEY_NAME)
        return key

    @staticmethod
    def _load_private(private_path: Path) -> Ed25519PrivateKey:
        mode = stat.S_IMODE(private_path.stat().st_mode)
        if mode & 0o077:
            raise PermissionDenied(
                f"daemon key {private_path} is accessible by group or others (mode {mode:04o})",
                data={"file": str(private_path), "mode": f"{mode:04o}"},
            )
        try:
            loaded = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise ValidationError(
                f"daemon key {private_path} is not an unencrypted PEM private key",
                data={"file": str(private_path)},
            ) from exc
        if not isinstance(loaded, Ed25519PrivateKey):
            raise ValidationError(
                f"daemon key {private_path} is not an Ed25519 key",
                data={"file": str(private_path)},
            )
        return loaded

    def _write_public_key(self, public_path: Path) -> None:
        openssh = self._private_key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        content = openssh + b" " + _PUBLIC_KEY_COMMENT.encode("ascii") + b"\n"
        # Derived from the private key, so (re)writing it is always safe.
        if not public_path.exists() or public_path.read_bytes() != content:
            atomic_write_bytes(public_path, content, mode=0o644)

    def sign(self, payload: bytes) -> str:
        """An Ed25519 signature over ``payload``, base64."""
        return base64.b64encode(self._private_key.sign(payload)).decode("ascii")

    @staticmethod
    def verify(payload: bytes, signature_b64: str, public_key_b64: str) -> None:
        """Same as :func:`verify_signature`."""
        verify_signature(payload, signature_b64, public_key_b64)

    def sign_record(self, record: dict[str, Any]) -> dict[str, Any]:
        """A copy of ``record`` with a ``signature`` block over the rest of it (any old one is
        replaced)."""
        signed = {key: value for key, value in record.items() if key != "signature"}
        signed["signature"] = {
            "alg": SIGNATURE_ALG,
            "key_id": self.key_id,
            "public_key": self.public_key_b64,
            "value": self.sign(_record_payload(record)),
        }
        return signed
