"""Peer credentials (SO_PEERCRED) and the policy that admits a connection, with real processes."""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.daemon_process import start_daemon

from modelsmith.rpc.peercred import PeerCredentials, PeerPolicy, peer_credentials

NOBODY = 65534
OTHER_UID = 4242  # no process here runs as this uid

# A client that speaks one ping frame and reports what came back before the close.
_CLIENT = """\
import socket, struct, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(15)
sock.connect(sys.argv[1])
print("connected", flush=True)
body = b'{"jsonrpc": "2.0", "id": 1, "method": "daemon.ping"}'
try:
    sock.sendall(struct.pack(">I", len(body)) + body)
except OSError:
    pass
received = b""
try:
    while chunk := sock.recv(65536):
        received += chunk
except ConnectionResetError:
    pass
print("closed", len(received), flush=True)
"""


@functools.cache
def unprivileged_python() -> list[str] | None:
    """``setpriv ... python`` as uid/gid 65534, or None where that cannot run here."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    drop = [setpriv, "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups"]
    for python in (sys.executable, "/usr/bin/python3", shutil.which("python3")):
        if not python:
            continue
        # -I: the interpreter must not try to read anything of ours (a venv under /root).
        probe = subprocess.run([*drop, python, "-I", "-c", "pass"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return [*drop, python, "-I"]
    return None


def require_unprivileged_python() -> list[str]:
    if os.getuid() != 0:
        pytest.skip("switching to another uid needs root")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    command = unprivileged_python()
    if command is None:
        pytest.skip("no Python interpreter here is executable by uid 65534")
    return command


def open_to_everyone(*paths: Path) -> None:
    for path in paths:
        os.chmod(path, 0o777 if path.is_socket() else 0o755)


@pytest.fixture
def own_credentials() -> Iterator[PeerCredentials]:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        yield peer_credentials(left)


def test_a_socketpair_reports_this_process_as_its_peer(own_credentials: PeerCredentials) -> None:
    assert own_credentials == PeerCredentials(pid=os.getpid(), uid=os.getuid(), gid=os.getgid())


def test_the_policy_admits_a_peer_of_the_daemons_own_uid(own_credentials: PeerCredentials) -> None:
    assert PeerPolicy(owner_uid=os.getuid()).allows(own_credentials)
    assert PeerPolicy.for_current_process().allows(own_credentials)


def test_the_policy_admits_root_whoever_owns_the_daemon(own_credentials: PeerCredentials) -> None:
    if own_credentials.uid != 0:
        pytest.skip("the tests do not run as root here")
    assert PeerPolicy(owner_uid=OTHER_UID).allows(own_credentials)


def test_the_policy_refuses_another_uid_unless_its_group_is_allowed() -> None:
    stranger = PeerCredentials(pid=1, uid=OTHER_UID, gid=OTHER_UID)
    assert not PeerPolicy(owner_uid=os.getuid()).allows(stranger)
    assert not PeerPolicy(owner_uid=os.getuid(), allowed_gids=frozenset({OTHER_UID + 1})).allows(stranger)
    assert PeerPolicy(owner_uid=os.getuid(), allowed_gids=frozenset({OTHER_UID})).allows(stranger)


def test_group_names_and_numbers_both_resolve_to_gids() -> None:
    policy = PeerPolicy.for_current_process(["root", str(NOBODY), 7])
    assert policy.allowed_gids == frozenset({0, NOBODY, 7})


def test_real_credentials_of_another_uid_are_refused_or_admitted_by_group(short_tmp: Path) -> None:
    command = require_unprivileged_python()
    path = short_tmp / "peer.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)
        listener.settimeout(20)
        open_to_everyone(short_tmp, path)
        client = subprocess.Popen(
            [*command, "-c", _CLIENT, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            connection, _ = listener.accept()
            with connection:
                peer = peer_credentials(connection)
        finally:
            client.communicate(timeout=20)
    assert (peer.uid, peer.gid) == (NOBODY, NOBODY)
    assert peer.pid == client.pid
    assert not PeerPolicy(owner_uid=os.getuid()).allows(peer)
    assert not PeerPolicy(owner_uid=os.getuid(), allowed_gids=frozenset({OTHER_UID})).allows(peer)
    assert PeerPolicy(owner_uid=os.getuid(), allowed_gids=frozenset({NOBODY})).allows(peer)
    assert PeerPolicy(owner_uid=NOBODY).allows(peer)


def test_the_daemon_closes_a_refused_peer_without_a_reply_and_keeps_serving(short_tmp: Path) -> None:
    command = require_unprivileged_python()
    socket_path = short_tmp / "run" / "ms.sock"
    with start_daemon(short_tmp / "home", socket_path=socket_path) as daemon:
        # Let uid 65534 reach the socket at all: only the peer check may stop it.
        open_to_everyone(short_tmp, socket_path.parent, socket_path)
        client = subprocess.run(
            [*command, "-c", _CLIENT, str(socket_path)], capture_output=True, text=True, timeout=30
        )
        assert client.returncode == 0, client.stderr
        assert client.stdout.split() == ["connected", "closed", "0"]
        assert daemon.call("daemon.ping")["pong"] is True
