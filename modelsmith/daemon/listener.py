"""Binding the RPC socket: 0660 inside a 0750 directory, or the one systemd hands us."""

from __future__ import annotations

import contextlib
import grp
import os
import socket
from pathlib import Path

from modelsmith.errors import ConflictError, ValidationError


def bind_unix_socket(path: Path, *, group: str | None = None) -> socket.socket:
    """Create the listening socket at ``path``.

    A missing directory is created 0750 (group ``group``); an existing one is left as it is.
    A stale socket file (nobody accepting) is replaced; a live one means another daemon owns it
    and is refused with ConflictError.
    """
    gid = -1
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ValidationError(f"socket_group {group!r} does not exist", data={"field": "socket_group"}) from None
    directory = path.parent
    if not directory.is_dir():
        directory.mkdir(parents=True, exist_ok=True)
        # Only a directory we created is ours to restrict: `--socket /tmp/x.sock` must not turn
        # /tmp (or anyone's existing directory) into 0750.
        os.chmod(directory, 0o750)
        if gid != -1:
            os.chown(directory, -1, gid)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
        else:
            raise ConflictError(
                f"another daemon is already serving at {path}", data={"socket": str(path)}
            )
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        old_umask = os.umask(0o117)  # the socket is born 0660, never briefly wider
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o660)
        if gid != -1:
            os.chown(path, -1, gid)
        sock.listen(128)
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise
    return sock


def bound_path(fd: int) -> Path | None:
    """The address a socket passed in by socket activation is bound to, without taking the fd.

    A filesystem socket gives its path (made absolute against our working directory, which is
    the activator's); an abstract one gives ``@name``; an unnamed socket or a descriptor that is
    not a socket gives None (:func:`inherited_socket` refuses the latter with a clear error).
    """
    try:
        copy = os.dup(fd)
    except OSError:
        return None
    try:
        probe = socket.socket(fileno=copy)
    except OSError:  # not a socket: the copy is still ours to close
        os.close(copy)
        return None
    try:
        name = probe.getsockname()
    except OSError:
        return None
    finally:
        probe.close()
    if isinstance(name, bytes):  # the abstract namespace: b"\0name"
        return Path("@" + name[1:].decode("utf-8", "replace")) if name[:1] == b"\0" else None
    if not isinstance(name, str) or not name:
        return None
    return Path(os.path.abspath(name))


def inherited_socket(fd: int) -> socket.socket:
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise ValidationError(f"inherited fd {fd} is not a Unix stream socket", data={"field": "LISTEN_FDS"})
    return sock
