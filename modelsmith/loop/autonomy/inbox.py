"""File drop: new scenario files in ``<cluster>/inbox/`` join the governed set and trigger a run.

A file is taken only once it is complete: editor temp files and partial writes (names starting
with '.', ending in '~', '.swp', '.tmp', '.part' ...) are ignored, and a file must keep the same
size and mtime across a short settle interval. The rule for writers (``docs/scenarios.md``):
write the file elsewhere on the same filesystem, then rename it into ``inbox/``.

Only a regular file owned by an allowed uid (:data:`ALLOWED_UIDS`: the daemon's own and root)
with a single link is taken. It is opened with ``O_NOFOLLOW | O_NONBLOCK`` and checked again with
``fstat`` on the opened descriptor, so a symlink, FIFO, directory or device - or a file swapped
for one after it was listed - is never read (nor blocks the watcher): it is moved to
``rejected/`` with a reason. A file over the scenario size limit is refused before it is read.

A good file is checked together with the whole existing set (a duplicate id across files is
refused naming the drop's file and line), written into ``scenarios/<set>/inbox-<sha12>-<name>``
atomically, recorded in the ledger (``scenarios.ingested`` and a new set version), and the
cluster's supervisor is asked for an eval. Identical content already ingested is a no-op. A drop
whose file changed while or after it was read (size, mtime or inode differ) is left in place and
taken again as a new drop, never lost.

A bad file moves to ``rejected/`` with a ``.error.txt`` that names only where the problem is
(file, line, field) and its kind - never the file's content. Stored names are the drop's name
with control characters replaced and shortened to :data:`MAX_STORED_NAME_BYTES`, so the prefix,
the ``.error.txt`` suffix and atomic-write temp names all fit in 255 bytes. When even the move
fails (ENOSPC, EACCES ...) the drop is left in place and reported once (``left_in_place``);
no OSError ever leaves this module into the daemon's task group. A burst of drops becomes one
trigger; files dropped while the daemon was down are taken at start.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import re
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import anyio
import anyio.abc
import structlog
import watchfiles

from modelsmith.atomic import atomic_write_bytes, atomic_write_text, fsync_dir
from modelsmith.errors import ModelsmithError
from modelsmith.hashing import sha256_hex
from modelsmith.loop.cluster.fleet import ClusterRuntime, Fleet
from modelsmith.loop.records.events import ScenariosIngested
from modelsmith.loop.scoring.scenarios import (
    MAX_SCENARIO_FILE_BYTES,
    SCENARIO_SUFFIXES,
    Scenario,
    ScenarioCatalog,
    ScenarioSet,
    parse_scenarios_located,
    prompt_byte_limit,
)
from modelsmith.loop.scoring.yaml_lines import file_error

__all__ = [
    "ALLOWED_UIDS",
    "MAX_STORED_NAME_BYTES",
    "DropOutcome",
    "InboxWatcher",
    "ingest",
    "is_candidate",
    "reject",
    "stored_name",
    "wait_complete",
]

log = structlog.get_logger("modelsmith.inbox")

_TEMP = re.compile(r"(^\.|^#.*#$|~$|\.sw[a-p]$|\.tmp$|\.part$|\.crdownload$|\.error\.txt$)")
SETTLE_S = 0.15
DEBOUNCE_MS = 150

#: Owners whose drops are taken: the daemon's own uid and root.
ALLOWED_UIDS: Final = frozenset({os.getuid(), 0})
#: A stored name keeps at most this many bytes of the drop's name: with ``inbox-<sha12>-``, a
#: ``.N`` counter, ``.error.txt`` and an atomic write's temp name it stays under 255 bytes.
MAX_STORED_NAME_BYTES: Final = 180
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_OPEN_FLAGS: Final = (
    os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
)

Trigger = Callable[[ClusterRuntime, str], Awaitable[bool]]
DropState = Literal["accepted", "duplicate", "rejected", "left", "changed", "gone"]


@dataclass(frozen=True, slots=True)
class DropOutcome:
    """What became of one drop. ``left``: it could not even be rejected and stays in the inbox
    (reported once); ``changed``: it changed while being taken and will be taken again."""

    file: str
    accepted: bool
    duplicate: bool
    detail: str
    state: DropState = "rejected"
    kind: str | None = None


def stored_name(name: str) -> str:
    """``name`` made safe to store: control characters (newlines included) and undecodable
    bytes become ``_``, and it is shortened to :data:`MAX_STORED_NAME_BYTES` keeping its suffix."""
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace").replace("\ufffd", "_")
    text = _CONTROL.sub("_", text) or "_"
    if len(text.encode()) <= MAX_STORED_NAME_BYTES:
        return text
    suffix = Path(text).suffix
    if len(suffix.encode()) > 16:
        suffix = ""
    stem = text[: len(text) - len(suffix)] if suffix else text
    budget = MAX_STORED_NAME_BYTES - len(suffix.encode())
    return stem.encode()[:budget].decode("utf-8", "ignore") + suffix


def is_candidate(path: Path) -> bool:
    """A name the watcher considers (temp and partial-write names are not); the type is checked
    when the drop is taken, without following links."""
    return not _TEMP.search(path.name)


async def wait_complete(path: Path, settle: float = SETTLE_S) -> bool:
    """True once ``path`` stops changing (same size and mtime across ``settle``); links are not
    followed, and a path that cannot be examined is complete (taking it will say why)."""
    try:
        before = await anyio.to_thread.run_sync(os.lstat, path)
        for _ in range(100):
            await anyio.sleep(settle)
            now = await anyio.to_thread.run_sync(os.lstat, path)
            if (now.st_size, now.st_mtime_ns) == (before.st_size, before.st_mtime_ns):
                return True
            before = now
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return False


# ---------------------------------------------------------------------------------------------
# Taking one drop


class _Refused(Exception):
    """A drop that is not taken, for a reason that names no content."""

    def __init__(self, kind: str, problem: str) -> None:
        super().__init__(problem)
        self.kind = kind
        self.problem = problem


class _Changed(Exception):
    """The drop changed while it was read: take it again later."""


_FILE_TYPES: Final = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _check_stat(st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        what = next((name for test, name in _FILE_TYPES if test(st.st_mode)), "not a file")
        raise _Refused("not_regular_file", f"{what}, not a regular file")
    if st.st_uid not in ALLOWED_UIDS:
        raise _Refused("wrong_owner", f"owned by uid {st.st_uid}, not by the daemon's user or root")
    if st.st_nlink != 1:
        raise _Refused("hard_link", "a file with several links (a hard link to another file)")
    if st.st_size > MAX_SCENARIO_FILE_BYTES:
        raise _Refused("too_large", f"{st.st_size} bytes; at most {MAX_SCENARIO_FILE_BYTES}")


def _signature(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _read_drop(path: Path) -> tuple[bytes, os.stat_result]:
    """The drop's bytes and the fstat they were read under; _Refused or _Changed otherwise."""
    _check_stat(os.lstat(path))
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _Refused("not_regular_file", "a symbolic link, not a regular file") from None
        raise
    try:
        before = os.fstat(fd)
        _check_stat(before)  # the name may have been swapped since lstat
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_SCENARIO_FILE_BYTES:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if _signature(after) != _signature(before) or len(data) != after.st_size:
        raise _Changed
    return data, after


def _unchanged(path: Path, taken: os.stat_result) -> bool:
    try:
        return _signature(os.lstat(path)) == _signature(taken)
    except OSError:
        return False


def _remove_taken(path: Path, taken: os.stat_result) -> bool:
    """Remove the drop only if it is still the file that was read; False leaves a new drop."""
    if not _unchanged(path, taken):
        return False
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    with contextlib.suppress(OSError):
        fsync_dir(path.parent)
    return True


def _check_against_catalog(
    runtime: ClusterRuntime, name: str, located: list[tuple[Scenario, int | None]]
) -> None:
    catalog = runtime.require_catalog()
    for index, (scenario, line) in enumerate(located):
        scenario_id = scenario.id
        existing = catalog.get(scenario_id)
        if existing is not None:
            raise file_error(
                "duplicate_id",
                f"id {scenario_id!r} is already in the {existing.set} set",
                file=name,
                line=line,
                field=f"scenarios[{index}].id",
                first_set=existing.set,
            )


def _ingest(runtime: ClusterRuntime, path: Path) -> DropOutcome:
    name = stored_name(path.name)
    data, taken = _read_drop(path)
    digest = sha256_hex(data)
    ledger = runtime.require_ledger()
    if any(r.event.sha256 == digest for r in ledger.find(ScenariosIngested)):
        removed = _remove_taken(path, taken)
        log.info("duplicate drop ignored", cluster=runtime.cluster.name, file=name)
        detail = "identical content already ingested" + ("" if removed else "; it changed since")
        return DropOutcome(name, accepted=False, duplicate=True, detail=detail, state="duplicate")
    if path.suffix.lower() not in SCENARIO_SUFFIXES:
        raise file_error(
            "unsupported_file",
            f"not a scenario file (expected one of {', '.join(SCENARIO_SUFFIXES)})",
            file=name,
        )
    limit = prompt_byte_limit(runtime.cluster.config.model.max_model_len)
    located = parse_scenarios_located(data, filename=name, max_prompt_bytes=limit,
                                      judge_engines=runtime.judge_engines)
    scenarios = [scenario for scenario, _ in located]
    sets = {s.set for s in scenarios}
    if len(sets) != 1:
        raise file_error(
            "mixed_sets",
            f"a dropped file must hold scenarios of one set, found {len(sets)}",
            file=name,
            field="set",
        )
    (set_name,) = sets
    if set_name == "synthetic":  # only synth.run writes it, after verification
        raise file_error("invalid_value", "synthetic scenarios come only from `modelsmith synth` "
                         "(verified before they are kept); drop core or held-out ones",
                         file=name, field="set")
    _check_against_catalog(runtime, name, located)
    catalog = runtime.require_catalog()
    merged = dict(catalog.sets)
    merged[set_name] = ScenarioSet.of(set_name, [*catalog.sets[set_name].scenarios, *scenarios])
    ScenarioCatalog(merged)  # the same invariant the loader keeps
    target = runtime.cluster.scenarios_dir / set_name / f"inbox-{digest[:12]}-{name}"
    atomic_write_bytes(target, data)
    runtime.record(
        ScenariosIngested(
            file=target.name,
            sha256=digest,
            set=set_name,
            count=len(scenarios),
            ids=sorted(s.id for s in scenarios),
        )
    )
    runtime.reload_scenarios()
    removed = _remove_taken(path, taken)
    log.info(
        "scenarios ingested", cluster=runtime.cluster.name, file=name, set=set_name,
        count=len(scenarios), drop_changed=not removed,
    )  # fmt: skip
    detail = f"{len(scenarios)} scenarios into {set_name}"
    if not removed:
        detail += "; the file changed after it was read and will be taken again"
    return DropOutcome(name, accepted=True, duplicate=False, detail=detail, state="accepted")


def ingest(runtime: ClusterRuntime, path: Path) -> DropOutcome:
    """Take one complete drop: apply it, reject it, or leave it (blocking; run in a thread).
    Never raises OSError or a validation error."""
    name = stored_name(path.name)
    error: ModelsmithError
    try:
        return _ingest(runtime, path)
    except FileNotFoundError:
        return DropOutcome(name, accepted=False, duplicate=False, detail="gone", state="gone")
    except _Changed:
        return DropOutcome(
            name, accepted=False, duplicate=False, state="changed",
            detail="changed while it was read; it will be taken again",
        )  # fmt: skip
    except _Refused as refused:
        error = file_error(refused.kind, refused.problem, file=name)
    except ModelsmithError as exc:
        error = exc
    except OSError as exc:
        error = file_error(
            "unreadable", f"cannot take it: {os.strerror(exc.errno or 0)}", file=name
        )
    kind = str(error.data.get("kind") or error.code)
    try:
        reject(runtime.cluster.root, path, error)
    except FileNotFoundError:
        return DropOutcome(name, accepted=False, duplicate=False, detail="gone", state="gone")
    except OSError as exc:
        detail = f"{error.message}; could not be moved to rejected/: {os.strerror(exc.errno or 0)}"
        log.error("drop left in the inbox", cluster=runtime.cluster.name, file=name, error=detail)
        return DropOutcome(
            name, accepted=False, duplicate=False, detail=detail, state="left", kind=kind
        )
    return DropOutcome(name, accepted=False, duplicate=False, detail=error.message, kind=kind)


def _error_text(exc: ModelsmithError) -> str:
    """Where the problem is and its kind: never the rejected file's content."""
    lines = [f"refused: {exc.data.get('kind') or exc.code}"]
    for key in ("file", "line", "field", "limit"):
        value = exc.data.get(key)
        if value is not None:
            lines.append(f"{key}: {_CONTROL.sub('_', str(value))}")
    lines.append(f"error: {exc.name} ({exc.code})")
    return "\n".join(lines) + "\n"


def reject(root: Path, path: Path, exc: ModelsmithError) -> Path:
    """Move the drop (whatever its type: links are moved, not followed) into ``rejected/`` with
    a ``.error.txt``. OSError when it cannot be moved; a missing error text does not stop it."""
    rejected = root / "rejected"
    rejected.mkdir(exist_ok=True)
    name = stored_name(path.name)
    base = Path(name)
    target = rejected / name
    n = 1
    while os.path.lexists(target) or os.path.lexists(f"{target}.error.txt"):
        n += 1
        target = rejected / f"{base.stem}.{n}{base.suffix}"
    try:
        atomic_write_text(
            target.with_name(target.name + ".error.txt"), _error_text(exc), mode=0o600
        )
    except OSError as write_error:  # ENOSPC: the move below needs no space
        log.warning("no error text for a rejected drop", file=name, error=str(write_error))
    os.replace(path, target)
    with contextlib.suppress(OSError):
        fsync_dir(rejected)
        fsync_dir(path.parent)
    log.warning("scenario drop rejected", file=name, kind=exc.data.get("kind"))
    return target


# ---------------------------------------------------------------------------------------------
# The watcher


class InboxWatcher:
    """Watches every cluster's inbox (watchfiles); a service: ``await tg.start(watcher.run)``."""

    def __init__(self, fleet: Fleet, trigger: Trigger) -> None:
        self.fleet = fleet
        self.trigger = trigger
        self.outcomes: collections.deque[DropOutcome] = collections.deque(maxlen=256)  # newest
        # Drops that could not even be rejected, by path and file signature: reported once.
        self._left: dict[Path, tuple[tuple[int, int, int, int], DropOutcome]] = {}

    def left_in_place(self) -> tuple[DropOutcome, ...]:
        """Drops still in an inbox because they could not be moved to ``rejected/``."""
        return tuple(outcome for _, outcome in self._left.values())

    def _runtimes(self) -> dict[Path, ClusterRuntime]:
        out: dict[Path, ClusterRuntime] = {}
        for runtime in self.fleet.runtimes.values():
            if runtime.ledger is None or runtime.catalog is None:
                continue
            inbox = runtime.cluster.root / "inbox"
            try:
                inbox.mkdir(exist_ok=True)
            except OSError as exc:
                log.error("no inbox", cluster=runtime.cluster.name, error=str(exc))
                continue
            out[inbox.resolve()] = runtime
        return out

    def _still_left(self, path: Path) -> bool:
        entry = self._left.get(path)
        if entry is None:
            return False
        try:
            if _signature(os.lstat(path)) == entry[0]:
                return True
        except OSError:
            pass
        del self._left[path]  # it changed or went: a new drop
        return False

    async def process(self, runtime: ClusterRuntime) -> list[DropOutcome]:
        inbox = runtime.cluster.root / "inbox"
        try:
            listed = await anyio.to_thread.run_sync(lambda: sorted(inbox.iterdir()))
        except OSError as exc:
            log.error("cannot list the inbox", cluster=runtime.cluster.name, error=str(exc))
            return []
        outcomes: list[DropOutcome] = []
        for path in listed:
            if not is_candidate(path) or self._still_left(path):
                continue
            if not await wait_complete(path):
                continue
            outcome = await anyio.to_thread.run_sync(ingest, runtime, path)
            if outcome.state == "left":
                with contextlib.suppress(OSError):
                    self._left[path] = (_signature(os.lstat(path)), outcome)
            outcomes.append(outcome)
        self.outcomes.extend(outcomes)
        runtime.inbox_left = {p.name: o.detail for p, (_, o) in self._left.items()
                              if p.parent == inbox}
        accepted = [o.file for o in outcomes if o.accepted]
        if accepted:
            await self.trigger(runtime, f"scenarios dropped: {', '.join(accepted)}")
        return outcomes

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        inboxes = await anyio.to_thread.run_sync(self._runtimes)
        for runtime in inboxes.values():  # drops made while the daemon was down
            await self.process(runtime)
        task_status.started()
        if not inboxes:
            await anyio.sleep_forever()
        async for changes in watchfiles.awatch(
            *inboxes, debounce=DEBOUNCE_MS, step=20, recursive=False
        ):
            touched = {Path(p).parent.resolve() for _, p in changes}
            for inbox in touched:
                if inbox in inboxes:
                    await self.process(inboxes[inbox])
