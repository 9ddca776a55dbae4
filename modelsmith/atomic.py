"""Crash-safe file writes: the one helper every durable write goes through.

temp file in the same directory, write, fsync, rename over the target, fsync the directory.
A crash at any line leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """fsync a directory so that a rename or a new entry in it survives a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(path: Path, data: bytes, mode: int) -> Path:
    """Write ``data`` to a temp file beside ``path`` and fsync it; returns the temp path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb", closefd=True) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    path = Path(path)
    tmp = _write_temp(path, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str, *, mode: int = 0o644) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def create_exclusive(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write a file that must never be overwritten (O_EXCL), durably.

    Raises FileExistsError when ``path`` exists. The content is written to a temp file first and
    then hard-linked into place, so the name never points at a half-written record.
    """
    path = Path(path)
    tmp = _write_temp(path, data, mode)
    try:
        os.link(tmp, path)  # fails with FileExistsError, like O_EXCL, and is atomic
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(path.parent)
