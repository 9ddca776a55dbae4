"""The daemon's signing key and signed records."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from modelsmith.errors import PermissionDenied, SignatureError, ValidationError
from modelsmith.loop.records.signing import (
    PRIVATE_KEY_NAME,
    PUBLIC_KEY_NAME,
    DaemonKey,
    canonical_json,
    verify_record,
    verify_signature,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_first_start_creates_a_private_key_only_its_owner_can_read(tmp_path: Path) -> None:
    keys_dir = tmp_path / "home" / "keys"
    key = DaemonKey.load_or_create(keys_dir)

    private_path = keys_dir / PRIVATE_KEY_NAME
    assert _mode(private_path) == 0o600
    assert _mode(keys_dir) == 0o700
    pem = private_path.read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    loaded = serialization.load_pem_private_key(pem, password=None)
    raw_public = loaded.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert base64.b64encode(raw_public).decode() == key.public_key_b64


def test_reloading_gives_the_same_key(tmp_path: Path) -> None:
    first = DaemonKey.load_or_create(tmp_path / "keys")
    second = DaemonKey.load_or_create(tmp_path / "keys")
    assert second.public_key_b64 == first.public_key_b64
    assert second.key_id == first.key_id
    verify_signature(b"payload", second.sign(b"payload"), first.public_key_b64)


def test_the_key_id_is_the_fingerprint_ssh_keygen_prints_for_the_public_key_file(
    tmp_path: Path,
) -> None:
    key = DaemonKey.load_or_create(tmp_path / "keys")
    printed = subprocess.run(
        ["ssh-keygen", "-l", "-f", str(tmp_path / "keys" / PUBLIC_KEY_NAME)],
        capture_output=True, check=True, text=True, timeout=30,
    ).stdout
    assert printed.split()[1] == key.key_id
    assert key.key_id.startswith("SHA256:")


def test_a_private_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    DaemonKey.load_or_create(tmp_path / "keys")
    os.chmod(tmp_path / "keys" / PRIVATE_KEY_NAME, 0o644)
    with pytest.raises(PermissionDenied):
        DaemonKey.load_or_create(tmp_path / "keys")


def test_daemons_starting_at_once_all_end_up_with_one_key(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    script = (
        "import sys; from pathlib import Path; from modelsmith.loop.records.signing import DaemonKey; "
        "print(DaemonKey.load_or_create(Path(sys.argv[1])).public_key_b64)"
    )
    starts = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(keys_dir)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    printed = {start.communicate(timeout=60)[0].strip() for start in starts}
    assert all(start.returncode == 0 for start in starts)
    assert printed == {DaemonKey.load_or_create(keys_dir).public_key_b64}
    assert sorted(path.name for path in keys_dir.iterdir()) == [PRIVATE_KEY_NAME, PUBLIC_KEY_NAME]


def test_a_signature_over_other_bytes_or_by_another_key_does_not_verify(tmp_path: Path) -> None:
    key = DaemonKey.load_or_create(tmp_path / "a")
    other = DaemonKey.load_or_create(tmp_path / "b")
    signature = key.sign(b"promote iter-3")

    DaemonKey.verify(b"promote iter-3", signature, key.public_key_b64)
    with pytest.raises(SignatureError) as caught:
        DaemonKey.verify(b"promote iter-4", signature, key.public_key_b64)
    assert caught.value.data["reason"] == "bad_signature"
    with pytest.raises(SignatureError) as caught:
        DaemonKey.verify(b"promote iter-3", signature, other.public_key_b64)
    assert caught.value.data["reason"] == "bad_signature"
    with pytest.raises(SignatureError) as caught:
        DaemonKey.verify(b"promote iter-3", "not base64!", key.public_key_b64)
    assert caught.value.data["reason"] == "malformed"


def test_canonical_json_sorts_keys_at_every_level_and_has_no_whitespace() -> None:
    assert canonical_json({"b": 1, "a": {"d": [1, 2], "c": None}}) == (
        b'{"a":{"c":null,"d":[1,2]},"b":1}'
    )
    with pytest.raises(ValidationError):
        canonical_json({"x": object()})


def test_a_signed_record_verifies_and_embeds_the_signature_block(tmp_path: Path) -> None:
    key = DaemonKey.load_or_create(tmp_path / "keys")
    record = {"kind": "promotion.request", "cluster": "sql", "iteration": 3, "score": 0.91}

    signed = key.sign_record(record)

    assert "signature" not in record
    block = signed["signature"]
    assert block["alg"] == "ed25519"
    assert block["key_id"] == key.key_id
    assert block["public_key"] == key.public_key_b64
    verify_record(signed, key.public_key_b64)


def test_any_change_to_a_signed_record_is_detected(tmp_path: Path) -> None:
    key = DaemonKey.load_or_create(tmp_path / "keys")
    signed = key.sign_record({"cluster": "sql", "iteration": 3, "gates": {"core": True}})

    tampered = {**signed, "iteration": 4}
    with pytest.raises(SignatureError) as caught:
        verify_record(tampered, key.public_key_b64)
    assert caught.value.data["reason"] == "bad_signature"

    nested = {**signed, "gates": {"core": False}}
    with pytest.raises(SignatureError) as caught:
        verify_record(nested, key.public_key_b64)
    assert caught.value.data["reason"] == "bad_signature"

    added = {**signed, "note": "looks fine"}
    with pytest.raises(SignatureError) as caught:
        verify_record(added, key.public_key_b64)
    assert caught.value.data["reason"] == "bad_signature"


def test_a_record_signed_by_an_untrusted_key_or_unsigned_is_refused(tmp_path: Path) -> None:
    trusted = DaemonKey.load_or_create(tmp_path / "trusted")
    intruder = DaemonKey.load_or_create(tmp_path / "intruder")
    forged = intruder.sign_record({"cluster": "sql", "iteration": 3})

    with pytest.raises(SignatureError) as caught:
        verify_record(forged, trusted.public_key_b64)
    assert caught.value.data["reason"] == "unknown_signer"
    with pytest.raises(SignatureError) as caught:
        verify_record({"cluster": "sql"}, trusted.public_key_b64)
    assert caught.value.data["reason"] == "malformed"


def test_re_signing_a_signed_record_replaces_its_signature(tmp_path: Path) -> None:
    key = DaemonKey.load_or_create(tmp_path / "keys")
    once = key.sign_record({"cluster": "sql"})
    twice = key.sign_record(once)
    assert twice == once  # Ed25519 is deterministic and the old block is not signed over
    verify_record(twice, key.public_key_b64)
