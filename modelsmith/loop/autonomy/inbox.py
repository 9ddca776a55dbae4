"""File drop: new scenario files in ``<cluster>/inbox/`` join the governed set and trigger a run.

A file is taken only once it is complete: editor temp files and partial writes (names starting
with '.', ending in '~', '.swp', '.tmp', '.part' ...) are ignored, and a file must keep the same
size and mtime across a short settle interval. A good file is checked together with the whole
existing set (so a duplicate id across files is refused too), written into
``scenarios/<set>/inbox-<sha12>-<name>`` atomically, recorded in the ledger
(``scenarios.ingested`` and a new set version), and the cluster's supervisor is asked for an
eval. Identical content already ingested is a no-op. A bad file moves to ``rejected/`` with a
``.error.txt`` naming what is wrong; nothing in the set changes. A burst of drops becomes one
trigger; files dropped while the daemon was down are taken at start.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
import structlog
import watchfiles

from modelsmith.atomic import atomic_write_bytes, atomic_write_text, fsync_dir
from modelsmith.errors import ModelsmithError, ValidationError
from modelsmith.hashing import sha256_hex
from modelsmith.loop.cluster.fleet import ClusterRuntime, Fleet
from modelsmith.loop.records.events import ScenariosIngested
from modelsmith.loop.scoring.scenarios import (
    SCENARIO_SUFFIXES,
    ScenarioCatalog,
    ScenarioSet,
    parse_scenarios,
)

log = structlog.get_logger("modelsmith.inbox")

_TEMP = re.compile(r"(^\.|^#.*#$|~$|\.sw[a-p]$|\.tmp$|\.part$|\.crdownload$|\.error\.txt$)")
SETTLE_S = 0.15
DEBOUNCE_MS = 150

Trigger = Callable[[ClusterRuntime, str], Awaitable[bool]]


@dataclass(frozen=True, slots=True)
class DropOutcome:
    file: str
    accepted: bool
    duplicate: bool
    detail: str


def is_candidate(path: Path) -> bool:
    return path.is_file() and not _TEMP.search(path.name)


async def wait_complete(path: Path, settle: float = SETTLE_S) -> bool:
    """True once ``path`` stops changing (same size and mtime across ``settle``)."""
    apath = anyio.Path(path)
    try:
        before = await apath.stat()
        for _ in range(100):
            await anyio.sleep(settle)
            now = await apath.stat()
            if (now.st_size, now.st_mtime_ns) == (before.st_size, before.st_mtime_ns):
                return True
            before = now
    except FileNotFoundError:
        return False
    return False


def ingest(runtime: ClusterRuntime, path: Path) -> DropOutcome:
    """Validate one complete drop and apply it, or reject it (blocking; run in a thread)."""
    root = runtime.cluster.root
    data = path.read_bytes()
    digest = sha256_hex(data)
    ledger = runtime.require_ledger()
    if any(r.event.sha256 == digest for r in ledger.find(ScenariosIngested)):
        path.unlink()
        log.info("duplicate drop ignored", cluster=runtime.cluster.name, file=path.name)
        return DropOutcome(path.name, accepted=False, duplicate=True, detail="identical content already ingested")
    try:
        if path.suffix.lower() not in SCENARIO_SUFFIXES:
            raise ValidationError(f"{path.name}: not a scenario file (expected one of {', '.join(SCENARIO_SUFFIXES)})",
                                  data={"file": path.name, "line": None, "field": None})
        scenarios = parse_scenarios(data, filename=path.name, default_set=None)
        sets = {s.set for s in scenarios}
        if len(sets) != 1:
            raise ValidationError(f"{path.name}: a dropped file must hold scenarios of one set, found {sorted(sets)}",
                                  data={"file": path.name, "line": None, "field": "set"})
        (set_name,) = sets
        catalog = runtime.require_catalog()
        merged = dict(catalog.sets)
        merged[set_name] = ScenarioSet.of(set_name, [*catalog.sets[set_name].scenarios, *scenarios])
        # Raises on an id already used anywhere in the cluster's sets.
        ScenarioCatalog(merged)
    except ModelsmithError as exc:
        reject(root, path, exc)
        return DropOutcome(path.name, accepted=False, duplicate=False, detail=exc.message)
    target = runtime.cluster.scenarios_dir / set_name / f"inbox-{digest[:12]}-{path.name}"
    atomic_write_bytes(target, data)
    runtime.record(ScenariosIngested(file=target.name, sha256=digest, set=set_name,
                                     count=len(scenarios), ids=sorted(s.id for s in scenarios)))
    runtime.reload_scenarios()
    path.unlink()
    fsync_dir(path.parent)
    log.info("scenarios ingested", cluster=runtime.cluster.name, file=path.name, set=set_name, count=len(scenarios))
    return DropOutcome(path.name, accepted=True, duplicate=False, detail=f"{len(scenarios)} scenarios into {set_name}")


def reject(root: Path, path: Path, exc: ModelsmithError) -> Path:
    rejected = root / "rejected"
    rejected.mkdir(exist_ok=True)
    target = rejected / path.name
    n = 1
    while target.exists():
        n += 1
        target = rejected / f"{path.stem}.{n}{path.suffix}"
    where = ", ".join(f"{k}: {exc.data[k]}" for k in ("file", "line", "field") if exc.data.get(k) is not None)
    atomic_write_text(target.with_name(target.name + ".error.txt"),
                      f"{exc.message}\n{where}\nerror: {exc.name} ({exc.code})\n")
    os.replace(path, target)
    fsync_dir(rejected)
    fsync_dir(path.parent)
    log.warning("scenario drop rejected", file=path.name, error=exc.message)
    return target


class InboxWatcher:
    """Watches every cluster's inbox (watchfiles); a service: ``await tg.start(watcher.run)``."""

    def __init__(self, fleet: Fleet, trigger: Trigger) -> None:
        self.fleet = fleet
        self.trigger = trigger
        self.outcomes: list[DropOutcome] = []

    def _runtimes(self) -> dict[Path, ClusterRuntime]:
        out: dict[Path, ClusterRuntime] = {}
        for runtime in self.fleet.runtimes.values():
            if runtime.ledger is None or runtime.catalog is None:
                continue
            inbox = runtime.cluster.root / "inbox"
            inbox.mkdir(exist_ok=True)
            out[inbox.resolve()] = runtime
        return out

    async def process(self, runtime: ClusterRuntime) -> list[DropOutcome]:
        inbox = runtime.cluster.root / "inbox"
        names = sorted(p for p in await anyio.to_thread.run_sync(lambda: list(inbox.iterdir())) if is_candidate(p))
        outcomes: list[DropOutcome] = []
        for path in names:
            if not await wait_complete(path):
                continue
            with contextlib.suppress(FileNotFoundError):
                outcomes.append(await anyio.to_thread.run_sync(ingest, runtime, path))
        self.outcomes.extend(outcomes)
        accepted = [o.file for o in outcomes if o.accepted]
        if accepted:
            await self.trigger(runtime, f"scenarios dropped: {', '.join(accepted)}")
        return outcomes

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        inboxes = await anyio.to_thread.run_sync(self._runtimes)
        for runtime in inboxes.values():  # drops made while the daemon was down
            await self.process(runtime)
        task_status.started()
        if not inboxes:
            await anyio.sleep_forever()
        async for changes in watchfiles.awatch(*inboxes, debounce=DEBOUNCE_MS, step=20, recursive=False):
            touched = {Path(p).parent.resolve() for _, p in changes}
            for inbox in touched:
                if inbox in inboxes:
                    await self.process(inboxes[inbox])
