"""Human approval of a promotion by SSH signature, checked against ``<home>/allowed_signers``.

A reviewer signs an :class:`ApprovalStatement` (built by :func:`make_statement`) with their own
SSH key, as git does for signed commits::

    ssh-keygen -Y sign -f ~/.ssh/id_ed25519 -n modelsmith-approval-v1 statement.json

and the daemon checks it with :func:`verify_approval`: the SSHSIG signature (via the ``sshsig``
package), the signer's line in ``allowed_signers`` (ssh-keygen(1) format: principals, options
``namespaces``, ``valid-after``, ``valid-before``; ``cert-authority`` lines are ignored because
a plain key signature never matches them, as in ssh-keygen), then what the statement says: the
cluster, the request digest, the nonce (replay) and its age.

Every refusal is a :class:`~modelsmith.errors.SignatureError` whose ``data["reason"]`` is one of
``unknown_signer``, ``wrong_namespace``, ``bad_signature``, ``digest_mismatch``,
``cluster_mismatch``, ``replayed``, ``expired``, ``not_yet_valid``, ``malformed``. A broken
``allowed_signers`` line is the operator's to fix: it raises ValidationError naming the line.

The CLI imports :func:`make_statement` from here, so ``sshsig`` (and with it ``cryptography``)
is imported only when a signature is verified.
"""

from __future__ import annotations

import functools
import re
import secrets
from collections.abc import Container
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from modelsmith.errors import SignatureError, ValidationError
from modelsmith.loop.records.ssh_sign import NAMESPACE

if TYPE_CHECKING:
    from sshsig import PublicKey

__all__ = [
    "CLOCK_SKEW",
    "NAMESPACE",
    "ApprovalStatement",
    "Decision",
    "VerifiedApproval",
    "make_statement",
    "verify_approval",
]

Decision = Literal["approve", "reject", "rollback", "accept"]  # accept: synthetic scenarios

CLOCK_SKEW = timedelta(minutes=5)
"""How far in the future a statement's time may lie (the reviewer's clock may run ahead)."""

# ssh-keygen itself signs with one of these; sshsig would accept any hashlib algorithm (md5 ...).
_ACCEPTED_HASH_ALGOS = frozenset({b"sha256", b"sha512"})
_NONCE_PATTERN = re.compile(r"[0-9a-f]{16,128}")
_DIGEST_PATTERN = re.compile(r"[0-9a-f]{64}")


class ApprovalStatement(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True,
                        omit_defaults=True):
    """What a reviewer signs. ``to_iteration`` only for ``rollback``, which may omit the request."""

    version: int  # always written, so a future format is told apart
    cluster: str
    request_id: str | None = None
    request_digest: str | None = None  # sha256 hex of the promotion request record file's bytes
    decision: Decision
    reason: str
    time: str  # RFC 3339, UTC
    nonce: str  # random hex; each nonce is honoured once
    to_iteration: int | None = None


class VerifiedApproval(msgspec.Struct, frozen=True):
    """A statement whose signature, signer and content all checked out."""

    principal: str  # the matching allowed_signers principals (or the one asked for)
    key_fingerprint: str  # "SHA256:...", as ssh-keygen -l prints it
    statement: ApprovalStatement


def _refuse(reason: str, message: str, **detail: Any) -> SignatureError:
    return SignatureError(message, data={"reason": reason, **detail})


def _format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(text: str) -> datetime | None:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    return moment


def make_statement(
    *,
    cluster: str,
    decision: Decision,
    reason: str,
    request_id: str | None = None,
    request_digest: str | None = None,
    to_iteration: int | None = None,
    time: datetime | None = None,
    nonce: str | None = None,
) -> bytes:
    """The canonical JSON bytes of an approval statement, ready for ``ssh-keygen -Y sign``.

    ``time`` defaults to now and ``nonce`` to 128 random bits. Raises ValidationError when the
    fields do not fit the decision (see :class:`ApprovalStatement`).
    """
    statement = ApprovalStatement(
        version=1,
        cluster=cluster,
        request_id=request_id,
        request_digest=request_digest,
        decision=decision,
        reason=reason,
        time=_format_time(time if time is not None else datetime.now(UTC)),
        nonce=nonce if nonce is not None else secrets.token_hex(16),
        to_iteration=to_iteration,
    )
    problem = _statement_problem(statement)
    if problem is not None:
        field, why = problem
        raise ValidationError(f"approval statement: {why}", data={"field": field})
    return msgspec.json.encode(statement, order="sorted")


def _statement_problem(statement: ApprovalStatement) -> tuple[str, str] | None:
    """The (field, why) of the first thing wrong with a statement's shape, or None."""
    if statement.version != 1:
        return "version", f"unsupported version {statement.version}"
    if not statement.cluster:
        return "cluster", "cluster is empty"
    if statement.decision in ("approve", "reject", "accept"):
        if not statement.request_id:
            return "request_id", f"{statement.decision} needs a request_id"
        if statement.request_digest is None:
            return "request_digest", f"{statement.decision} needs a request_digest"
        if statement.to_iteration is not None:
            return "to_iteration", "to_iteration is only for rollback"
    elif statement.to_iteration is None or statement.to_iteration < 0:
        return "to_iteration", "rollback needs a to_iteration >= 0"
    if statement.request_digest is not None and not _DIGEST_PATTERN.fullmatch(
        statement.request_digest
    ):
        return "request_digest", "request_digest is not a sha256 hex digest"
    if not _NONCE_PATTERN.fullmatch(statement.nonce):
        return "nonce", "nonce is not 16-128 lower-case hex digits"
    if _parse_time(statement.time) is None:
        return "time", "time is not an RFC 3339 timestamp with a zone"
    return None


# ---------------------------------------------------------------------------------------------
# allowed_signers


@dataclass(frozen=True)
class _AllowedSignerLine:
    line_number: int
    principals: str
    namespaces: str | None
    valid_after: datetime | None
    valid_before: datetime | None
    key: PublicKey


@functools.lru_cache(maxsize=256)
def _pattern_regex(pattern: str) -> re.Pattern[str]:
    # OpenSSH patterns know only '*' and '?'; fnmatch's '[...]' would be a different language.
    parts = (".*" if char == "*" else "." if char == "?" else re.escape(char) for char in pattern)
    return re.compile("".join(parts), re.DOTALL)


def _match_pattern_list(value: str, patterns: str) -> bool:
    """OpenSSH match_pattern_list: comma-separated patterns, a '!' pattern vetoes a match."""
    matched = False
    for pattern in patterns.split(","):
        negated = pattern.startswith("!")
        if _pattern_regex(pattern[1:] if negated else pattern).fullmatch(value):
            if negated:
                return False
            matched = True
    return matched


def _parse_validity_time(text: str) -> datetime | None:
    """ssh-keygen's YYYYMMDD[Z] or YYYYMMDDHHMM[SS][Z]; without Z it is local time, as there."""
    utc = text.endswith(("Z", "z"))
    digits = text[:-1] if utc else text
    formats = {8: "%Y%m%d", 12: "%Y%m%d%H%M", 14: "%Y%m%d%H%M%S"}
    if not digits.isdigit() or len(digits) not in formats:
        return None
    try:
        moment = datetime.strptime(digits, formats[len(digits)])
    except ValueError:
        return None
    return moment.replace(tzinfo=UTC) if utc else moment.astimezone()


def _load_allowed_signers(path: Path) -> list[_AllowedSignerLine]:
    """Parse allowed_signers with sshsig's line parser, keeping line numbers for errors."""
    from sshsig import PublicKey
    from sshsig.allowed_signers import AllowedSigner

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []  # no reviewers yet: every signer is unknown
    signers: list[_AllowedSignerLine] = []
    for line_number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue

        def invalid(why: str, number: int = line_number) -> ValidationError:
            return ValidationError(
                f"{path}:{number}: {why}",
                data={"file": str(path), "line": number, "reason": why},
            )

        try:
            parsed = AllowedSigner.parse(line)
        except (ValueError, IndexError) as exc:
            raise invalid(f"not an allowed_signers line ({exc})") from exc
        options = {name.lower(): value for name, value in (parsed.options or {}).items()}
        if "cert-authority" in options:
            continue  # matches only certificates, which approvals do not use
        try:
            key = PublicKey.from_openssh_str(f"{parsed.key_type} {parsed.base64_key}")
        except NotImplementedError:
            continue  # a key type sshsig cannot verify can never match a verified signature
        except ValueError as exc:
            raise invalid(f"bad public key ({exc})") from exc
        bounds: dict[str, datetime | None] = {}
        for option in ("valid-after", "valid-before"):
            value = options.get(option)
            bounds[option] = None if value is None else _parse_validity_time(value)
            if value is not None and bounds[option] is None:
                raise invalid(f"{option}={value!r} is not YYYYMMDD[HHMM[SS]][Z]")
        signers.append(
            _AllowedSignerLine(
                line_number=line_number,
                principals=parsed.principals,
                namespaces=options.get("namespaces"),
                valid_after=bounds["valid-after"],
                valid_before=bounds["valid-before"],
                key=key,
            )
        )
    return signers


def _admit_signer(
    signers: list[_AllowedSignerLine],
    signer_key: PublicKey,
    principal: str | None,
    now: datetime,
    fingerprint: str,
) -> _AllowedSignerLine:
    """The first allowed_signers line that admits this key now, in the way ssh-keygen checks."""
    candidates = [
        signer
        for signer in signers
        if signer.key == signer_key
        and (principal is None or _match_pattern_list(principal, signer.principals))
    ]
    if not candidates:
        raise _refuse("unknown_signer", "the signing key is not in allowed_signers",
                      key_fingerprint=fingerprint)
    first_refusal: SignatureError | None = None
    for signer in candidates:
        refusal: SignatureError | None = None
        if signer.namespaces is not None and not _match_pattern_list(NAMESPACE, signer.namespaces):
            refusal = _refuse("wrong_namespace",
                              f"allowed_signers line {signer.line_number} excludes {NAMESPACE}",
                              key_fingerprint=fingerprint, line=signer.line_number)
        elif signer.valid_after is not None and now < signer.valid_after:
            refusal = _refuse("not_yet_valid",
                              f"key on allowed_signers line {signer.line_number} is not yet valid",
                              key_fingerprint=fingerprint, line=signer.line_number)
        elif signer.valid_before is not None and now > signer.valid_before:
            refusal = _refuse("expired",
                              f"key on allowed_signers line {signer.line_number} has expired",
                              key_fingerprint=fingerprint, line=signer.line_number)
        if refusal is None:
            return signer
        first_refusal = first_refusal or refusal
    assert first_refusal is not None
    raise first_refusal


# ---------------------------------------------------------------------------------------------
# verification


def _check_sshsig(statement_bytes: bytes, armored_signature: str) -> PublicKey:
    """Verify the SSHSIG signature itself; return the key embedded in (and proven by) it."""
    from sshsig import InvalidSignature, check_signature
    from sshsig.sshsig import SshsigSignature

    try:
        outer = SshsigSignature.from_armored(armored_signature)
    except (ValueError, NotImplementedError, UnicodeError) as exc:
        raise _refuse("malformed", "not an armored SSH signature") from exc
    if outer.namespace != NAMESPACE.encode("ascii"):
        raise _refuse("wrong_namespace",
                      f"signature is for namespace {outer.namespace!r}, not {NAMESPACE}")
    if outer.hash_algo not in _ACCEPTED_HASH_ALGOS:
        raise _refuse("malformed", f"signature hash {outer.hash_algo!r} is not sha256/sha512")
    try:
        return check_signature(statement_bytes, armored_signature, NAMESPACE)
    except InvalidSignature as exc:
        raise _refuse("bad_signature", "signature does not match the statement") from exc
    except (NotImplementedError, ValueError) as exc:
        raise _refuse("malformed", f"signature cannot be checked: {exc}") from exc
    except AssertionError as exc:  # sshsig asserts the inner algorithm name
        raise _refuse("bad_signature", "signature algorithm does not match its key") from exc


def verify_approval(
    statement_bytes: bytes,
    armored_signature: str,
    allowed_signers_path: Path,
    *,
    expect_cluster: str,
    expect_request_digest: str | None,
    seen_nonces: Container[str],
    now: datetime,
    max_age: timedelta = timedelta(minutes=30),
    principal: str | None = None,
) -> VerifiedApproval:
    """Check a signed approval statement; return who approved what, or refuse.

    ``expect_request_digest`` binds the statement to one promotion request (None only where no
    request is involved, as for a rollback). ``seen_nonces`` holds the nonces already honoured
    (from the ledger). ``principal``, if given, must match the signer line's principal patterns,
    like ``ssh-keygen -Y verify -I``; otherwise any line with the key counts, like
    ``-Y find-principals``. Key validity dates are checked at ``now``.

    Raises SignatureError (``data["reason"]`` names the refusal, see the module docstring), or
    ValidationError for a malformed allowed_signers file or a naive ``now``.
    """
    if now.tzinfo is None:
        raise ValidationError("now must be timezone-aware", data={"field": "now"})
    signer_key = _check_sshsig(statement_bytes, armored_signature)
    fingerprint = signer_key.sha256_str()
    signers = _load_allowed_signers(Path(allowed_signers_path))
    signer = _admit_signer(signers, signer_key, principal, now, fingerprint)

    try:
        statement = msgspec.json.decode(statement_bytes, type=ApprovalStatement)
    except msgspec.DecodeError as exc:
        raise _refuse("malformed", f"statement is not an approval statement: {exc}") from exc
    problem = _statement_problem(statement)
    if problem is not None:
        field, why = problem
        raise _refuse("malformed", f"statement: {why}", field=field)
    if statement.cluster != expect_cluster:
        raise _refuse("cluster_mismatch", "statement is for another cluster",
                      cluster=statement.cluster)
    if expect_request_digest is not None and statement.request_digest != expect_request_digest:
        raise _refuse("digest_mismatch", "statement is for another promotion request",
                      request_id=statement.request_id)
    if statement.nonce in seen_nonces:
        raise _refuse("replayed", "statement nonce was already used", nonce=statement.nonce)
    signed_at = _parse_time(statement.time)
    assert signed_at is not None  # _statement_problem checked it
    if now - signed_at > max_age:
        raise _refuse("expired", f"statement is older than {max_age}", time=statement.time)
    if signed_at - now > CLOCK_SKEW:
        raise _refuse("not_yet_valid", "statement time lies in the future", time=statement.time)

    return VerifiedApproval(
        principal=principal if principal is not None else signer.principals,
        key_fingerprint=fingerprint,
        statement=statement,
    )
