"""Human approvals: statements signed by real `ssh-keygen -Y sign`, checked against allowed_signers."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from modelsmith.errors import NotFound, SignatureError, ValidationError
from modelsmith.loop.records.approval import (
    NAMESPACE,
    VerifiedApproval,
    make_statement,
    verify_approval,
)
from modelsmith.loop.records.ssh_sign import sign_with_ssh_keygen

CLUSTER = "sql-review"
REQUEST_DIGEST = hashlib.sha256(b'{"request":"promote iter-3"}').hexdigest()


@dataclass
class Reviewer:
    name: str
    key_path: Path
    public_line: str  # "ssh-ed25519 AAAA... comment"

    def sign(self, statement: bytes, namespace: str = NAMESPACE) -> str:
        return sign_with_ssh_keygen(statement, self.key_path, namespace)

    def fingerprint(self) -> str:
        printed = subprocess.run(
            ["ssh-keygen", "-l", "-f", f"{self.key_path}.pub"],
            capture_output=True, check=True, text=True, timeout=30,
        ).stdout
        return printed.split()[1]


def _make_reviewer(directory: Path, name: str) -> Reviewer:
    key_path = directory / f"id_{name}"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key_path)],
        check=True, timeout=30,
    )
    return Reviewer(name, key_path, Path(f"{key_path}.pub").read_text().strip())


@pytest.fixture
def alice(tmp_path: Path) -> Reviewer:
    return _make_reviewer(tmp_path, "alice")


@pytest.fixture
def mallory(tmp_path: Path) -> Reviewer:
    return _make_reviewer(tmp_path, "mallory")


def _allowed_signers(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "allowed_signers"
    path.write_text("# reviewers of the sql-review cluster\n\n" + "\n".join(lines) + "\n")
    return path


def _statement(**overrides: Any) -> bytes:
    fields: dict[str, Any] = {
        "cluster": CLUSTER,
        "decision": "approve",
        "reason": "held-out up 4 points, no regressions",
        "request_id": "req-2026-11-26-1",
        "request_digest": REQUEST_DIGEST,
        "time": datetime.now(UTC),
    }
    fields.update(overrides)
    return make_statement(**fields)


def _verify(
    statement: bytes, signature: str, allowed: Path, **overrides: Any
) -> VerifiedApproval:
    arguments: dict[str, Any] = {
        "expect_cluster": CLUSTER,
        "expect_request_digest": REQUEST_DIGEST,
        "seen_nonces": frozenset(),
        "now": datetime.now(UTC),
    }
    arguments.update(overrides)
    return verify_approval(statement, signature, allowed, **arguments)


def _refusal(statement: bytes, signature: str, allowed: Path, **overrides: Any) -> str:
    with pytest.raises(SignatureError) as caught:
        _verify(statement, signature, allowed, **overrides)
    return str(caught.value.data["reason"])


def test_a_statement_signed_by_an_allowed_reviewer_is_accepted(
    tmp_path: Path, alice: Reviewer
) -> None:
    allowed = _allowed_signers(tmp_path, f"alice@example.com {alice.public_line}")
    statement = _statement()

    approval = _verify(statement, alice.sign(statement), allowed)

    assert approval.principal == "alice@example.com"
    assert approval.key_fingerprint == alice.fingerprint()
    assert approval.statement.decision == "approve"
    assert approval.statement.cluster == CLUSTER
    assert approval.statement.request_digest == REQUEST_DIGEST


def test_the_statement_is_canonical_json_with_a_random_nonce() -> None:
    first, second = _statement(), _statement()
    decoded = msgspec.json.decode(first)
    assert list(decoded) == sorted(decoded)
    assert decoded["version"] == 1
    assert decoded["time"].endswith("Z")
    assert "to_iteration" not in decoded
    assert decoded["nonce"] != msgspec.json.decode(second)["nonce"]


def test_a_signer_missing_from_allowed_signers_is_refused(
    tmp_path: Path, alice: Reviewer, mallory: Reviewer
) -> None:
    allowed = _allowed_signers(tmp_path, f"alice@example.com {alice.public_line}")
    statement = _statement()
    assert _refusal(statement, mallory.sign(statement), allowed) == "unknown_signer"


def test_without_an_allowed_signers_file_every_signer_is_unknown(
    tmp_path: Path, alice: Reviewer
) -> None:
    statement = _statement()
    reason = _refusal(statement, alice.sign(statement), tmp_path / "absent")
    assert reason == "unknown_signer"


def test_a_signature_made_for_another_namespace_is_refused(
    tmp_path: Path, alice: Reviewer
) -> None:
    allowed = _allowed_signers(tmp_path, f"alice@example.com {alice.public_line}")
    statement = _statement()
    git_signature = alice.sign(statement, namespace="git")
    assert _refusal(statement, git_signature, allowed) == "wrong_namespace"


def test_a_key_restricted_to_other_namespaces_cannot_approve(
    tmp_path: Path, alice: Reviewer
) -> None:
    allowed = _allowed_signers(tmp_path, f'alice@example.com namespaces="git,file" {alice.public_line}')
    statement = _statement()
    assert _refusal(statement, alice.sign(statement), allowed) == "wrong_namespace"


def test_a_key_allowed_for_the_approval_namespace_by_pattern_can_approve(
    tmp_path: Path, alice: Reviewer
) -> None:
    allowed = _allowed_signers(
        tmp_path, f'alice@example.com namespaces="git,modelsmith-*" {alice.public_line}'
    )
    statement = _statement()
    assert _verify(statement, alice.sign(statement), allowed).principal == "alice@example.com"


def test_a_signature_over_other_bytes_is_refused(tmp_path: Path, alice: Reviewer) -> None:
    allowed = _allowed_signers(tmp_path, f"alice@example.com {alice.public_line}")
    signed = _statement(reason="looks good")
    other = _statement(reason="looks good")  # same shape, another nonce
    assert _refusal(other, alice.sign(signed), allowed) == "bad_signature"


def test_a_statement_changed_by_a_single_byte_is_refused(tmp_path: Path, alice: Reviewer) -> None:
    allowed = _allowed_signers(tmp_path, f"alice@example.com {alice.public_line}")
    statement = _statement(decision="reject", reason="regressions on joins")
    signature = alice.sign(statement)
    tampered = statement.replace(b'"reject"', b'"approve"')
    assert tampered != statement
    assert _refusal(tampered, signature, allowed) == "bad_signature"

    flipped = bytearray(statement)
    flipped[len(flipped) // 2] ^= 0x01
    assert _refusal(bytes(flipped), signature, allowed) == "bad_signature"


def test_a_statement_for_another_request_is_refused(tmp_path: Path, alice: Reviewer) -> None:
    allowed = _allowed_signers(tmp_path, f"alice@example.com {alice.public_line}")
    statement = _statement(request_digest=hashlib.sha256(b"an older request").hexdigest())
    assert _refusal(statement, alice.sign(statement), allowed) == "digest_mismatch"


def test_a_statement_for_another_cluster_is_refused(tmp_path: Path, alice: Reviewer) -> None:
    allowed = _allowed_signers(tmp_path, f"alice@example.com {alice.public_line}")
    statement = _statement(cluster="code-review")
    assert _refusal(statement, alice.sign(statement), allowed) == "cluster_mismatch"


def test_a_statement_whose_nonce_was_already_used_is_refused(
    tmp_path: Path, alice: Reviewer
) -> None:
    allowed = _allowed_signers(tmp_path, f"alice@example.com {alice.public_line}")
    statement = _statement()
    signature = alice.sign(statement)
    nonce = _verify(statement, signature, allowed).statement.nonce
    assert _refusal(statement, signature, allowed, seen_nonces={nonce}) == "replayed"


def test_a_statement_older_than_the_maximum_age_is_refused(
    tmp_path: Path, alice: Reviewer
) -> None:
    allowed = _allowed_signers(tmp_path, f"alice@example.com {alice.public_line}")
    now = datetime.now(UTC)
    statement = _statement(time=now - timedelta(minutes=31))
    signature = alice.sign(statement)
    assert _refusal(statement, signature, allowed, now=now) == "expired"
    # The same statement is fine under a longer window.
    _verify(statement, signature, allowed, now=now, max_age=timedelta(hours=1))


def test_a_statement_dated_beyond_the_clock_skew_in_the_future_is_refused(
    tmp_path: Path, alice: Reviewer
) -> None:
    allowed = _allowed_signers(tmp_path, f"alice@example.com {alice.public_line}")
    now = datetime.now(UTC)
    ahead = _statement(time=now + timedelta(minutes=10))
    assert _refusal(ahead, alice.sign(ahead), allowed, now=now) == "not_yet_valid"
    slightly_ahead = _statement(time=now + timedelta(minutes=2))
    _verify(slightly_ahead, alice.sign(slightly_ahead), allowed, now=now)


def test_a_key_past_its_valid_before_date_is_refused(tmp_path: Path, alice: Reviewer) -> None:
    allowed = _allowed_signers(
        tmp_path, f'alice@example.com valid-before="20200101Z" {alice.public_line}'
    )
    statement = _statement()
    assert _refusal(statement, alice.sign(statement), allowed) == "expired"


def test_a_key_before_its_valid_after_date_is_refused(tmp_path: Path, alice: Reviewer) -> None:
    allowed = _allowed_signers(
        tmp_path, f'alice@example.com valid-after="209901011200Z" {alice.public_line}'
    )
    statement = _statement()
    assert _refusal(statement, alice.sign(statement), allowed) == "not_yet_valid"


def test_a_key_inside_its_validity_window_is_accepted(tmp_path: Path, alice: Reviewer) -> None:
    allowed = _allowed_signers(
        tmp_path,
        f'alice@example.com valid-after="20200101",valid-before="20991231235959Z" '
        f"{alice.public_line}",
    )
    statement = _statement()
    _verify(statement, alice.sign(statement), allowed)


def test_a_cert_authority_line_never_admits_a_plain_key_signature(
    tmp_path: Path, alice: Reviewer
) -> None:
    allowed = _allowed_signers(tmp_path, f"*@example.com cert-authority {alice.public_line}")
    statement = _statement()
    assert _refusal(statement, alice.sign(statement), allowed) == "unknown_signer"


def test_wildcard_principals_match_the_asked_identity_and_negations_veto_it(
    tmp_path: Path, alice: Reviewer
) -> None:
    allowed = _allowed_signers(
        tmp_path, f"*@example.com,!intern@example.com {alice.public_line}"
    )
    statement = _statement()
    signature = alice.sign(statement)

    approval = _verify(statement, signature, allowed, principal="alice@example.com")
    assert approval.principal == "alice@example.com"
    assert _verify(statement, signature, allowed).principal == "*@example.com,!intern@example.com"
    assert _refusal(statement, signature, allowed, principal="alice@other.org") == "unknown_signer"
    reason = _refusal(statement, signature, allowed, principal="intern@example.com")
    assert reason == "unknown_signer"


def test_quoted_principals_and_a_later_line_for_the_same_key_are_understood(
    tmp_path: Path, alice: Reviewer
) -> None:
    allowed = _allowed_signers(
        tmp_path,
        f'"alice@example.com,lead@example.com" namespaces="git" {alice.public_line}',
        f"alice@example.com {alice.public_line}",
    )
    statement = _statement()
    assert _verify(statement, alice.sign(statement), allowed).principal == "alice@example.com"


def test_garbage_instead_of_a_signature_is_malformed(tmp_path: Path, alice: Reviewer) -> None:
    allowed = _allowed_signers(tmp_path, f"alice@example.com {alice.public_line}")
    statement = _statement()
    assert _refusal(statement, "not a signature", allowed) == "malformed"
    armored_junk = "-----BEGIN SSH SIGNATURE-----\nU1NIU0lH\n-----END SSH SIGNATURE-----\n"
    assert _refusal(statement, armored_junk, allowed) == "malformed"


def test_signed_bytes_that_are_not_an_approval_statement_are_malformed(
    tmp_path: Path, alice: Reviewer
) -> None:
    allowed = _allowed_signers(tmp_path, f"alice@example.com {alice.public_line}")
    for payload in (b"please promote", b'{"cluster":"sql-review","decision":"approve"}'):
        assert _refusal(payload, alice.sign(payload), allowed) == "malformed"


def test_a_rollback_names_its_target_iteration_and_needs_no_request(
    tmp_path: Path, alice: Reviewer
) -> None:
    allowed = _allowed_signers(tmp_path, f"alice@example.com {alice.public_line}")
    statement = make_statement(
        cluster=CLUSTER, decision="rollback", reason="production regressions", to_iteration=2
    )
    approval = _verify(statement, alice.sign(statement), allowed, expect_request_digest=None)
    assert approval.statement.decision == "rollback"
    assert approval.statement.to_iteration == 2


def test_make_statement_refuses_fields_that_do_not_fit_the_decision() -> None:
    with pytest.raises(ValidationError):
        make_statement(cluster=CLUSTER, decision="approve", reason="ok", request_id="r-1")
    with pytest.raises(ValidationError):
        make_statement(cluster=CLUSTER, decision="rollback", reason="back")
    with pytest.raises(ValidationError):
        make_statement(
            cluster=CLUSTER, decision="approve", reason="ok", request_id="r-1",
            request_digest="not-a-digest",
        )


def test_a_broken_allowed_signers_line_is_reported_with_its_line_number(
    tmp_path: Path, alice: Reviewer
) -> None:
    allowed = _allowed_signers(
        tmp_path, f"alice@example.com {alice.public_line}", "bob@example.com ssh-ed25519"
    )
    statement = _statement()
    with pytest.raises(ValidationError) as caught:
        _verify(statement, alice.sign(statement), allowed)
    assert caught.value.data["line"] == 4
    assert caught.value.data["file"] == str(allowed)


def test_signing_with_a_missing_key_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        sign_with_ssh_keygen(b"{}", tmp_path / "no_such_key")


def test_signing_with_a_file_that_is_not_a_key_fails_with_sign_failed(tmp_path: Path) -> None:
    not_a_key = tmp_path / "id_broken"
    not_a_key.write_text("this is not a key\n")
    not_a_key.chmod(0o600)
    with pytest.raises(SignatureError) as caught:
        sign_with_ssh_keygen(b"{}", not_a_key, timeout_s=30)
    assert caught.value.data["reason"] == "sign_failed"


def test_the_cli_side_modules_do_not_import_cryptography() -> None:
    probe = (
        "import sys, modelsmith.loop.records.ssh_sign; "
        "print(sorted(m for m in ('cryptography', 'msgspec', 'sshsig') if m in sys.modules)); "
        "import modelsmith.loop.records.approval; "
        "print(sorted(m for m in ('cryptography', 'sshsig') if m in sys.modules))"
    )
    printed = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, check=True, text=True, timeout=60
    ).stdout.splitlines()
    assert printed == ["[]", "[]"]


@pytest.mark.parametrize(
    ("options", "accepted"),
    [
        ("", True),
        ('namespaces="git,modelsmith-*" ', True),
        ('namespaces="git" ', False),
        ('valid-before="20200101Z" ', False),
        ('valid-after="20990101Z" ', False),
    ],
)
def test_verification_agrees_with_ssh_keygen_verify_on_the_same_allowed_signers(
    tmp_path: Path, alice: Reviewer, options: str, accepted: bool
) -> None:
    allowed = _allowed_signers(tmp_path, f"alice@example.com {options}{alice.public_line}")
    statement = _statement()
    signature = alice.sign(statement)
    signature_path = tmp_path / "statement.sig"
    signature_path.write_text(signature)

    by_ssh_keygen = subprocess.run(
        ["ssh-keygen", "-Y", "verify", "-f", str(allowed), "-I", "alice@example.com",
         "-n", NAMESPACE, "-s", str(signature_path)],
        input=statement, capture_output=True, timeout=30, check=False,
    )
    assert (by_ssh_keygen.returncode == 0) == accepted

    if accepted:
        _verify(statement, signature, allowed, principal="alice@example.com")
    else:
        with pytest.raises(SignatureError):
            _verify(statement, signature, allowed, principal="alice@example.com")
