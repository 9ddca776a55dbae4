"""LoRA adapters on disk: atomic save with a manifest of file hashes, and verification.

An adapter directory is only an adapter when its ``manifest.json`` lists every file in it with
the right sha256. The manifest is written last, inside a ``<out_dir>.partial-<pid>`` directory
that is renamed into place only after every byte is fsynced, so a crash at any point leaves
either no ``out_dir`` or a complete one (plus, at worst, a stale ``.partial-*`` sibling that the
next save removes).

Standard library and msgspec only: the model is anything with PEFT's ``save_pretrained``, so the
daemon can verify adapters without importing torch.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import msgspec

from modelsmith.atomic import atomic_write_bytes, fsync_dir
from modelsmith.errors import ConflictError, ValidationError

__all__ = [
    "MANIFEST_NAME",
    "AdapterFile",
    "AdapterManifest",
    "SavesPretrained",
    "adapter_hash",
    "encode_manifest",
    "hash_file_list",
    "manifest_sha256",
    "read_manifest",
    "remove_stale_partials",
    "save_adapter_atomically",
    "verify_adapter",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
_CHUNK = 1 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl")


class SavesPretrained(Protocol):
    """What a PEFT model offers: write its adapter files into a directory."""

    def save_pretrained(self, save_directory: str, /, **kwargs: Any) -> Any: ...


class AdapterFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One file of an adapter: path relative to the adapter dir (POSIX), sha256, size."""

    name: str
    sha256: str
    size: int


class AdapterManifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The record that makes a directory an adapter. ``adapter_sha256`` is its identity."""

    format: int
    adapter_sha256: str
    base_model: str
    created_at: str
    files: list[AdapterFile]


_manifest_decoder = msgspec.json.Decoder(AdapterManifest)


def hash_file_list(files: list[AdapterFile]) -> str:
    """The adapter hash: sha256 over ``name NUL sha256 LF`` for each file, sorted by name."""
    digest = hashlib.sha256()
    for entry in sorted(files, key=lambda f: f.name):
        digest.update(f"{entry.name}\0{entry.sha256}\n".encode())
    return digest.hexdigest()


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _content_files(directory: Path) -> list[Path]:
    """Every regular file under ``directory`` except the manifest (and our temp files)."""
    found = []
    for path in sorted(directory.rglob("*")):
        if path.is_dir():
            continue
        relative = path.relative_to(directory).as_posix()
        if relative == MANIFEST_NAME:
            continue
        found.append(path)
    return found


def _base_model_of(model: SavesPretrained) -> str:
    # PEFT keeps the base model's path in each adapter's config; "default" is the one we train.
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and peft_config:
        config = peft_config.get("default") or next(iter(peft_config.values()))
        name = getattr(config, "base_model_name_or_path", None)
        if isinstance(name, str):
            return name
    return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(out_dir: Path) -> list[Path]:
    """Remove ``<out_dir>.partial-<pid>`` siblings whose writer is gone; returns what went."""
    out_dir = Path(out_dir)
    removed: list[Path] = []
    if not out_dir.parent.is_dir():
        return removed
    prefix = f"{out_dir.name}.partial-"
    for candidate in out_dir.parent.iterdir():
        if not candidate.name.startswith(prefix):
            continue
        pid_text = candidate.name[len(prefix) :]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and _pid_alive(int(pid_text)):
            continue
        shutil.rmtree(candidate, ignore_errors=True)
        removed.append(candidate)
    return removed


def save_adapter_atomically(
    model: SavesPretrained,
    out_dir: Path,
    *,
    base_model: str | None = None,
    replace: bool = False,
    extra_files: dict[str, bytes] | None = None,
) -> AdapterManifest:
    """Save ``model``'s adapter at ``out_dir`` with a manifest, all or nothing.

    ``out_dir`` must not exist unless ``replace`` is true; a replaced adapter is moved aside and
    removed only after the new one is in place (a crash in that window leaves the new adapter in
    its ``.partial-*`` dir and the old one in a ``.replaced-*`` dir, never a torn ``out_dir``).
    ``extra_files`` (name -> bytes, e.g. ``canaries.json``) are written next to the adapter
    files before hashing, so the manifest covers them.
    Raises ConflictError when ``out_dir`` exists and ``replace`` is false.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not replace:
        raise ConflictError(f"adapter directory exists: {out_dir}", data={"path": str(out_dir)})
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out_dir)
    partial = out_dir.with_name(f"{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    replaced: Path | None = None
    try:
        partial.mkdir()
        model.save_pretrained(str(partial))
        for name, content in (extra_files or {}).items():
            (partial / name).write_bytes(content)
        files = []
        for path in _content_files(partial):
            _fsync_file(path)
            files.append(
                AdapterFile(
                    name=path.relative_to(partial).as_posix(),
                    sha256=_sha256_of(path),
                    size=path.stat().st_size,
                )
            )
        for sub in {p.parent for p in _content_files(partial)} - {partial}:
            fsync_dir(sub)
        manifest = AdapterManifest(
            format=MANIFEST_FORMAT,
            adapter_sha256=hash_file_list(files),
            base_model=base_model if base_model is not None else _base_model_of(model),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            files=files,
        )
        # Last: its presence is what makes the directory an adapter. Also fsyncs `partial`.
        atomic_write_bytes(partial / MANIFEST_NAME, encode_manifest(manifest))
        if out_dir.exists():
            replaced = out_dir.with_name(f"{out_dir.name}.replaced-{os.getpid()}")
            shutil.rmtree(replaced, ignore_errors=True)
            os.rename(out_dir, replaced)
        os.rename(partial, out_dir)
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        if replaced is not None and replaced.exists() and not out_dir.exists():
            os.rename(replaced, out_dir)  # put the old adapter back
        raise
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    return manifest


def encode_manifest(manifest: AdapterManifest) -> bytes:
    return msgspec.json.format(msgspec.json.encode(manifest), indent=2) + b"\n"


def read_manifest(adapter_dir: Path) -> AdapterManifest:
    """The manifest as written, without checking the files; ValidationError when unreadable."""
    path = Path(adapter_dir) / MANIFEST_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise ValidationError(
            f"not an adapter (no {MANIFEST_NAME}): {adapter_dir}", data={"file": str(path)}
        ) from exc
    try:
        return _manifest_decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise ValidationError(f"bad adapter manifest: {exc}", data={"file": str(path)}) from exc


def _is_loadable(name: str) -> bool:
    """Would PEFT or vLLM read this file when loading the adapter? (Then it must be listed.)"""
    base = name.rsplit("/", 1)[-1]
    return base.startswith("adapter_") or base.endswith(_WEIGHT_SUFFIXES)


def verify_adapter(adapter_dir: Path) -> AdapterManifest:
    """Check every file of the adapter against its manifest; returns the manifest.

    Raises ValidationError with ``data["file"]`` naming the first missing or altered file, or an
    unlisted file that a loader would read (``adapter_*``, weight files), or the manifest itself
    when it is absent, unreadable, or inconsistent. Other unlisted files are sidecars (for
    example the daemon's ``training_manifest.json``) and do not change what loads.
    """
    adapter_dir = Path(adapter_dir)
    manifest = read_manifest(adapter_dir)
    manifest_path = str(adapter_dir / MANIFEST_NAME)
    if manifest.format != MANIFEST_FORMAT:
        raise ValidationError(
            f"unknown adapter manifest format {manifest.format}",
            data={"file": manifest_path, "field": "format"},
        )
    listed = {entry.name for entry in manifest.files}
    for entry in manifest.files:
        path = adapter_dir / entry.name
        if not path.is_file():
            raise ValidationError(
                f"adapter file missing: {entry.name}", data={"file": str(path), "reason": "missing"}
            )
        if path.stat().st_size != entry.size or _sha256_of(path) != entry.sha256:
            raise ValidationError(
                f"adapter file altered: {entry.name}", data={"file": str(path), "reason": "altered"}
            )
    for path in _content_files(adapter_dir):
        relative = path.relative_to(adapter_dir).as_posix()
        if relative not in listed and _is_loadable(relative):
            raise ValidationError(
                f"adapter file not in manifest: {path.name}",
                data={"file": str(path), "reason": "unlisted"},
            )
    if hash_file_list(manifest.files) != manifest.adapter_sha256:
        raise ValidationError(
            "adapter manifest hash does not match its file list",
            data={"file": manifest_path, "field": "adapter_sha256"},
        )
    return manifest


def adapter_hash(adapter_dir: Path) -> str:
    """The verified hash of ``adapter_dir``; raises ValidationError if it does not verify."""
    return verify_adapter(adapter_dir).adapter_sha256


def manifest_sha256(adapter_dir: Path) -> str:
    """sha256 of the ``manifest.json`` bytes (what a ledger event can pin)."""
    return _sha256_of(Path(adapter_dir) / MANIFEST_NAME)

