"""Binding the RPC socket: 0660 inside a 0750 directory, or the one systemd hands us."""

from __future__ import annotations

import contextlib
import grp
import os
import socket
import stat
from pathlib import Path

from modelsmith.errors import ConflictError, ValidationError


def bind_unix_socket(path: Path, *, group: str | None = None) -> socket.socket:
    """Create the listening socket at ``path``.

    A missing directory is created 0750 (group ``group``); an existing one is left as it is.
    Only a stale *socket* is replaced (see :func:`_remove_stale_socket`): a live one means
    another daemon owns it (ConflictError); anything else at ``path`` is never touched.
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
    _remove_stale_socket(path)
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


def _remove_stale_socket(path: Path) -> None:
    """Unlink ``path`` only if it is a socket file that refuses connections (nobody accepting).

    A regular file, a directory, a symlink or anything else there is refused with
    ValidationError naming the path, and left byte for byte as it was: ``--socket`` pointing at
    a ledger must not delete the ledger.
    """
    if not refuse_non_socket(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)  # a full backlog answers EAGAIN at once instead of blocking us
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        pass  # a socket file nobody accepts on: stale, ours to replace
    except BlockingIOError:
        # The backlog is full: someone is serving there (and is busy).
        raise ConflictError(f"another daemon is already serving at {path}", data={"socket": str(path)}) from None
    except OSError as exc:
        raise ValidationError(
            f"{path}: cannot tell whether another daemon serves there ({exc.strerror or exc}); "
            "refusing to replace it",
            data={"field": "socket", "socket": str(path), "reason": "socket_unprobeable"},
        ) from exc
    else:
        raise ConflictError(f"another daemon is already serving at {path}", data={"socket": str(path)})
    finally:
        probe.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def refuse_non_socket(path: Path) -> bool:
    """Raise ValidationError naming ``path`` when something other than a socket is there.

    Returns whether a socket file is there. The daemon calls it before it opens any cluster,
    so a wrong ``--socket`` stops it before a single file of the home is read or repaired.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISSOCK(mode):
        return True
    kind = _file_kind(mode)
    raise ValidationError(
        f"{path} exists and is {kind}, not a socket; refusing to replace it "
        "(choose another --socket path)",
        data={"field": "socket", "socket": str(path), "reason": "not_a_socket", "kind": kind},
    )


def _file_kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    return "a special file"


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
