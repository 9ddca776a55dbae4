"""Which base model a directory holds, by content, and the defaults it ships with.

:func:`base_model_identity` hashes what names a model without reading its weights: the bytes of
``config.json`` and of the weights index (``model.safetensors.index.json``), or, for a model
saved in a single or unindexed set of ``*.safetensors`` files, their names and sizes. Reading
gigabytes of weights per training job would cost minutes; the index names every tensor and the
shard holding it, and a changed shard almost always changes its size. The result is cached in
this process by each input file's mtime and size, so repeated calls stat a few files and stop.

:func:`generation_defaults` reads the model's own ``generation_config.json`` sampling defaults,
which an eval uses where the cluster sets none.

Standard library only: loop/ imports this module freely.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["GenerationDefaults", "ModelIdentity", "base_model_identity", "generation_defaults"]

CONFIG_FILE = "config.json"
WEIGHTS_INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
_IDENTITY_VERSION = 1


@dataclass(frozen=True, slots=True)
class ModelIdentity:
    """A content hash of a base model's config and weights index, and what went into it."""

    sha256: str
    files: tuple[str, ...]  # the names hashed (bytes) or listed (name and size), sorted
    method: str  # "index" (config + weights index) or "sizes" (config + shard names and sizes)


_Stamp = tuple[tuple[str, int, int], ...]  # (name, mtime_ns, size) of every input file
_cache: dict[Path, tuple[_Stamp, ModelIdentity]] = {}
_cache_lock = threading.Lock()


def _stamp(model_dir: Path) -> tuple[_Stamp, bool]:
    """The inputs' (name, mtime_ns, size), and whether a weights index is among them."""
    names = [CONFIG_FILE]
    indexed = (model_dir / WEIGHTS_INDEX).is_file()
    if indexed:
        names.append(WEIGHTS_INDEX)
    else:
        names.extend(sorted(p.name for p in model_dir.glob("*.safetensors")))
    entries: list[tuple[str, int, int]] = []
    for name in names:
        path = model_dir / name
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        entries.append((name, st.st_mtime_ns, st.st_size))
    return tuple(entries), indexed


def base_model_identity(model_dir: Path) -> ModelIdentity | None:
    """The identity of the model in ``model_dir``; None when it has no ``config.json`` (a
    hosted model behind an OpenAI-compatible server has no local directory)."""
    model_dir = Path(model_dir).resolve()
    stamp, indexed = _stamp(model_dir)
    if not stamp or stamp[0][0] != CONFIG_FILE:
        return None
    with _cache_lock:
        cached = _cache.get(model_dir)
        if cached is not None and cached[0] == stamp:
            return cached[1]
    digest = hashlib.sha256(f"modelsmith-model-identity/{_IDENTITY_VERSION}\n".encode())
    for name, _mtime, size in stamp:
        if name in (CONFIG_FILE, WEIGHTS_INDEX):
            data = (model_dir / name).read_bytes()
            digest.update(f"{name}\0{len(data)}\0".encode())
            digest.update(data)
        else:
            digest.update(f"{name}\0size={size}\0".encode())
    identity = ModelIdentity(
        sha256=digest.hexdigest(),
        files=tuple(name for name, _, _ in stamp),
        method="index" if indexed else "sizes",
    )
    with _cache_lock:
        _cache[model_dir] = (stamp, identity)
    return identity


@dataclass(frozen=True, slots=True)
class GenerationDefaults:
    """The sampling defaults a model ships in ``generation_config.json`` (None: not given)."""

    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None


def generation_defaults(model_dir: Path) -> GenerationDefaults:
    """Read ``generation_config.json``; a missing or unreadable file gives no defaults.

    ``do_sample = false`` (transformers' greedy switch) reads as temperature 0.
    """
    try:
        raw: Any = json.loads((Path(model_dir) / GENERATION_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return GenerationDefaults()
    if not isinstance(raw, dict):
        return GenerationDefaults()

    def number(key: str) -> float | None:
        value = raw.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return float(value)

    temperature = number("temperature")
    if raw.get("do_sample") is False:
        temperature = 0.0
    top_p = number("top_p")
    if top_p is not None and not 0 < top_p <= 1:
        top_p = None
    if temperature is not None and temperature < 0:
        temperature = None
    max_new = raw.get("max_new_tokens")
    max_new_tokens = max_new if isinstance(max_new, int) and not isinstance(max_new, bool) else None
    if max_new_tokens is not None and max_new_tokens < 1:
        max_new_tokens = None
    return GenerationDefaults(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
