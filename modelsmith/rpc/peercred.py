"""Peer credentials of a Unix-socket connection (SO_PEERCRED) and the allow-list check.

The check runs on the accepted socket before a single byte is read from it.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

_UCRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid=pid, uid=uid, gid=gid)


@dataclass(frozen=True, slots=True)
class PeerPolicy:
    """Who may talk to the daemon: its own uid, root, and members of the allowed groups."""

    owner_uid: int
    allowed_gids: frozenset[int] = frozenset()

    @classmethod
    def for_current_process(cls, groups: Iterable[str | int] = ()) -> PeerPolicy:
        return cls(owner_uid=os.getuid(), allowed_gids=frozenset(resolve_gids(groups)))

    def allows(self, peer: PeerCredentials) -> bool:
        if peer.uid in (self.owner_uid, 0):
            return True
        if not self.allowed_gids:
            return False
        if peer.gid in self.allowed_gids:
            return True
        return bool(self.allowed_gids & supplementary_gids(peer.uid))


def resolve_gids(groups: Iterable[str | int]) -> set[int]:
    gids: set[int] = set()
    for group in groups:
        if isinstance(group, int) or str(group).isdigit():
            gids.add(int(group))
        else:
            gids.add(grp.getgrnam(str(group)).gr_gid)
    return gids


def supplementary_gids(uid: int) -> set[int]:
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return set()
    return set(os.getgrouplist(user.pw_name, user.pw_gid))
