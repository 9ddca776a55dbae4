"""Adapters and checkpoints between nodes through Ray's object store, verified by hash.

The route when ``[ray] shared_storage = false`` (docs/scale.md): the sender packs a directory
into an :class:`ArtifactPack` (each file's bytes with its sha256 and size, plus the sha256 of the
file list); the receiver :func:`unpack` s it into ``<dest>.partial-<pid>``, checks every file's
hash and the list's, fsyncs, and only then renames it into place. A pack that is short, altered,
or names a path outside its directory is a ValidationError and nothing is left at ``dest``: a
partial transfer is never used. An adapter that carries its own ``manifest.json``
(:mod:`modelsmith.gpu.adapters`) is verified against it too once it has arrived.

Standard library and msgspec only (no Ray): the pack is a plain value Ray pickles into its
object store.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from modelsmith.atomic import fsync_dir
from modelsmith.errors import ValidationError
from modelsmith.gpu.adapters import MANIFEST_NAME, verify_adapter

__all__ = ["MAX_PACK_BYTES", "ArtifactPack", "pack", "unpack"]

MAX_PACK_BYTES = 8 * 1024**3
"""The largest artifact that travels through the object store (a LoRA adapter is megabytes;
full checkpoints that big belong on shared storage)."""


@dataclass(frozen=True)
class ArtifactPack:
    """A directory's files: ``files[name] = (sha256, bytes)``; ``digest`` pins the list."""

    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    digest: str = ""

    @property
    def size(self) -> int:
        return sum(len(data) for _, data in self.files.values())


def _list_digest(entries: list[tuple[str, str, int]]) -> str:
    h = hashlib.sha256()
    for name, sha, size in sorted(entries):
        h.update(f"{name}\0{sha}\0{size}\n".encode())
    return h.hexdigest()


def pack(directory: Path, *, max_bytes: int = MAX_PACK_BYTES) -> ArtifactPack:
    """Every regular file under ``directory`` (symlinks refused) with its hash."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValidationError(f"no artifact directory at {directory}", data={"file": str(directory)})
    files: dict[str, tuple[str, bytes]] = {}
    total = 0
    for path in sorted(directory.rglob("*")):
        if path.is_symlink():
            raise ValidationError(f"artifact holds a symlink: {path}", data={"file": str(path)})
        if not path.is_file():
            continue
        data = path.read_bytes()
        total += len(data)
        if total > max_bytes:
            raise ValidationError(f"artifact {directory} is over {max_bytes} bytes: put it on "
                                  "shared storage ([ray] shared_storage)",
                                  data={"file": str(directory), "reason": "too_large"})
        files[path.relative_to(directory).as_posix()] = (hashlib.sha256(data).hexdigest(), data)
    digest = _list_digest([(name, sha, len(data)) for name, (sha, data) in files.items()])
    return ArtifactPack(files=files, digest=digest)


def _safe_name(name: str, dest: Path) -> Path:
    pure = PurePosixPath(name)
    if (not name or pure.is_absolute() or any(part in ("", ".", "..") for part in pure.parts)
            or "\\" in name or "\0" in name):
        raise ValidationError(f"artifact file name {name!r} leaves its directory",
                              data={"file": str(dest), "field": name, "reason": "unsafe_name"})
    return dest.joinpath(*pure.parts)


def unpack(artifact: ArtifactPack, dest: Path, *, expected_digest: str | None = None) -> Path:
    """Write ``artifact`` to ``dest`` all or nothing, each file checked by hash; returns ``dest``.

    ``expected_digest`` (what the sender announced separately, e.g. in a job's result) must
    match the pack's own. ``dest`` must not exist yet (ConflictError-free: a ValidationError
    names it), so an artifact already in place is never overwritten half-way.
    """
    dest = Path(dest)
    if dest.exists():
        raise ValidationError(f"artifact destination exists already: {dest}",
                              data={"file": str(dest), "reason": "exists"})
    entries = []
    for name, (sha, data) in artifact.files.items():
        if hashlib.sha256(data).hexdigest() != sha:
            raise ValidationError(f"artifact file {name} does not match its hash (a partial or "
                                  "altered transfer)", data={"file": name, "reason": "altered"})
        entries.append((name, sha, len(data)))
    digest = _list_digest(entries)
    if digest != artifact.digest or (expected_digest is not None and digest != expected_digest):
        raise ValidationError("artifact file list does not match its digest (files missing or "
                              "added in transit)", data={"file": str(dest), "reason": "digest"})
    partial = dest.with_name(f"{dest.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        for name, (_, data) in sorted(artifact.files.items()):
            path = _safe_name(name, partial)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        for directory in sorted({p.parent for p in partial.rglob("*")} | {partial}, reverse=True):
            fsync_dir(directory)
        if (partial / MANIFEST_NAME).is_file():
            verify_adapter(partial)  # the adapter's own manifest, as on the daemon's box
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(partial, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return dest
