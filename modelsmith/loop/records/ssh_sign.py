"""Client side of human approval: sign a statement with the reviewer's own SSH key.

Used by ``modelsmith approve`` on the CLI's hot path, so this module imports only the standard
library (and the stdlib-only error root): ``ssh-keygen -Y sign`` does the cryptography, with the
reviewer's key, agent and passphrase prompt exactly as ``git commit -S`` would use them.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from modelsmith.errors import NotFound, SignatureError

__all__ = ["NAMESPACE", "sign_with_ssh_keygen"]

NAMESPACE = "modelsmith-approval-v1"
"""The SSHSIG namespace of approval statements: a signature made for git or another tool never
counts as an approval."""

_ARMOR_BEGIN = "-----BEGIN SSH SIGNATURE-----"


def sign_with_ssh_keygen(
    statement: bytes,
    key_path: Path,
    namespace: str = NAMESPACE,
    *,
    timeout_s: float = 300.0,
) -> str:
    """Sign ``statement`` with ``ssh-keygen -Y sign -n NAMESPACE -f KEY``; return the armored
    signature.

    ``key_path`` is a private key, or a public key whose private half is in the ssh-agent. The
    timeout leaves time for a passphrase prompt (ssh-keygen asks on the terminal, not on stdin).
    Raises NotFound when ssh-keygen or the key is missing, SignatureError (``reason``
    ``"sign_failed"``) when ssh-keygen refuses or fails.
    """
    key_path = Path(key_path).expanduser()
    ssh_keygen = shutil.which("ssh-keygen")
    if ssh_keygen is None:
        raise NotFound("ssh-keygen is not installed (package openssh-client)",
                       data={"program": "ssh-keygen"})
    if not key_path.exists():
        raise NotFound(f"no SSH key at {key_path}", data={"file": str(key_path)})
    command = [ssh_keygen, "-q", "-Y", "sign", "-n", namespace, "-f", str(key_path)]
    try:
        # With no file argument ssh-keygen signs stdin and writes the signature to stdout.
        completed = subprocess.run(
            command, input=statement, capture_output=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise SignatureError(
            f"ssh-keygen did not finish within {timeout_s:g} s",
            data={"reason": "sign_failed", "file": str(key_path)},
        ) from exc
    armored = completed.stdout.decode("ascii", errors="replace")
    if completed.returncode != 0 or _ARMOR_BEGIN not in armored:
        stderr = completed.stderr.decode("utf-8", errors="replace").strip()
        raise SignatureError(
            f"ssh-keygen could not sign with {key_path}: {stderr or 'no signature produced'}",
            data={
                "reason": "sign_failed",
                "file": str(key_path),
                "exit_code": completed.returncode,
                "stderr": stderr[-2000:],
            },
        )
    return armored
