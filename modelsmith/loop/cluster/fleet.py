"""The fleet: every cluster the daemon found, its live runtime state, and the status methods."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import anyio
import anyio.from_thread
import msgspec
from anyio.lowlevel import EventLoopToken, current_token

from modelsmith.clock import utc_now
from modelsmith.errors import ModelsmithError, NotFound, Unavailable
from modelsmith.loop.cluster.config import Cluster, ClusterProblem, discover_clusters
from modelsmith.loop.cluster.recovery import records_without_ledger
from modelsmith.loop.cluster.state import ClusterState, LoopState, apply
from modelsmith.loop.records.events import LedgerEvent, ScenariosChanged
from modelsmith.loop.records.ledger import Ledger, Recorded
from modelsmith.loop.scoring.scenarios import ScenarioCatalog, load_catalog, prompt_byte_limit
from modelsmith.rpc.dispatch import MethodTable
from modelsmith.rpc.schema.daemon import (
    ClusterLoadError,
    ClusterParams,
    ClusterStatus,
    FleetParams,
    FleetStatus,
)
from modelsmith.rpc.schema.evals import EvalSummary
from modelsmith.rpc.server import CallContext

E = TypeVar("E", bound=LedgerEvent)  # type: ignore[misc]


@dataclass(eq=False)
class ClusterRuntime:
    """One cluster in the daemon: its ledger, the state reduced from it, its scenario catalog.

    Phase, iteration, champion, candidate, last eval and pending promotion are read-only views of
    :attr:`state`, which only the ledger changes (see :mod:`modelsmith.loop.cluster.state`).
    Writers call :meth:`record`; waiters call :meth:`wait_state`.
    """

    cluster: Cluster
    scenario_count: int = 0
    scenario_versions: dict[str, str] = field(default_factory=dict)
    status_error: str | None = None
    inbox_left: dict[str, str] = field(default_factory=dict)  # drops that could not be moved
    judge_engines: frozenset[str] | None = None  # names a judge may use besides "cluster"
    judge_models: Mapping[str, str] | None = None  # each named engine's model (judge identity)
    ledger: Ledger | None = None
    catalog: ScenarioCatalog | None = None
    state: ClusterState = field(default_factory=ClusterState)
    _waiters: list[tuple[anyio.Event, EventLoopToken, int]] = field(default_factory=list)
    _waiters_lock: threading.Lock = field(default_factory=threading.Lock)
    _summary_cache: tuple[str, EvalSummary | None] | None = None

    # -- derived (read-only) -----------------------------------------------------------------
    @property
    def phase(self) -> str:
        if self.ledger is None and self.status_error is not None:
            return LoopState.FAILED.value
        return self.state.phase.value

    @property
    def iteration(self) -> int:
        return self.state.iteration

    @property
    def champion(self) -> str | None:
        return self.state.champion

    @property
    def candidate(self) -> str | None:
        return self.state.candidate

    @property
    def pending_promotion(self) -> str | None:
        return self.state.pending_promotion

    @property
    def last_eval_tag(self) -> str | None:
        return self.state.last_eval_tag

    @property
    def last_summary(self) -> EvalSummary | None:
        """The summary file of the last finished eval, read once per tag (a missing or bad file
        too: status is served on the event loop and must not re-read it on every call; the
        summary is written before its eval.finished, so a later tag is a later file)."""
        tag = self.state.last_eval_tag
        if tag is None:
            return None
        cached = self._summary_cache
        if cached is None or cached[0] != tag:
            path = self.cluster.evals_dir() / tag / "summary.json"
            try:
                summary: EvalSummary | None = msgspec.json.decode(path.read_bytes(), type=EvalSummary)
            except (OSError, msgspec.DecodeError, msgspec.ValidationError):
                summary = None
            self._summary_cache = cached = (tag, summary)
        return cached[1]

    # -- the ledger ----------------------------------------------------------------------------
    def require_ledger(self) -> Ledger:
        if self.ledger is None:
            raise Unavailable(
                f"cluster {self.cluster.name} is not available: {self.status_error or 'not opened'}",
                data={"cluster": self.cluster.name},
            )
        return self.ledger

    def record(self, event: E) -> Recorded[E]:
        """Append ``event`` durably (blocking: call it from a worker thread); the state follows."""
        recorded = self.require_ledger().append(event)
        self._notify()
        return recorded

    def _apply(self, recorded: Recorded[LedgerEvent]) -> None:
        self.state = apply(self.state, recorded)

    def _notify(self) -> None:
        with self._waiters_lock:
            waiters, self._waiters = self._waiters, []
        here = threading.get_ident()
        for event, token, loop_thread in waiters:
            if here == loop_thread:
                event.set()
            else:
                anyio.from_thread.run_sync(event.set, token=token)

    async def wait_state(self, predicate: Callable[[ClusterState], bool]) -> ClusterState:
        """Wait until the reduced state satisfies ``predicate`` (woken by each append)."""
        while not predicate(self.state):
            event = anyio.Event()
            with self._waiters_lock:
                self._waiters.append((event, current_token(), threading.get_ident()))
            if predicate(self.state):
                break
            await event.wait()
        return self.state

    def require_catalog(self) -> ScenarioCatalog:
        if self.catalog is None:
            raise Unavailable(
                f"cluster {self.cluster.name} has no valid scenario set: {self.status_error or 'not loaded'}",
                data={"cluster": self.cluster.name},
            )
        return self.catalog

    def adapter_path(self, name: str) -> Path:
        return self.cluster.root / "adapters" / name

    def open(self) -> None:
        """Open the ledger (verifying it) and the scenario catalog; reduce the state from it.

        Blocking: call it from a worker thread. A bad ledger or scenario set leaves the cluster
        unavailable with ``status_error`` saying why; other clusters are not affected.
        """
        if not self.cluster.ledger_path.exists():
            orphans = records_without_ledger(self.cluster.root)
            if orphans:
                self.status_error = (f"ledger.jsonl is missing but the cluster holds records only a "
                                     f"ledger vouches for ({', '.join(orphans[:3])}"
                                     f"{' ...' if len(orphans) > 3 else ''}); restore it from a backup")
                return
        try:
            ledger = Ledger.open(self.cluster.ledger_path)
        except ModelsmithError as exc:
            self.status_error = f"ledger does not verify: {exc.message}"
            return
        self.state = ClusterState()
        ledger.replay(self._apply)
        self.ledger = ledger
        self.reload_scenarios()

    def read_catalog(self) -> ScenarioCatalog:
        """The governed sets as the files hold them now, under this cluster's limits (prompt
        bytes for its ``max_model_len``, the judge engines the daemon knows). Blocking."""
        return load_catalog(
            self.cluster.scenarios_dir,
            max_prompt_bytes=prompt_byte_limit(self.cluster.config.model.max_model_len),
            judge_engines=self.judge_engines)

    def reload_scenarios(self) -> list[str]:
        """Load the governed sets; a changed set version becomes a ledger event. Returns changed sets."""
        self.require_ledger()
        try:
            catalog = self.read_catalog()
        except ModelsmithError as exc:
            self.status_error = f"scenario sets do not load: {exc.message}"
            return []
        self.catalog = catalog
        versions = catalog.versions()
        before = dict(self.state.scenario_versions)
        changed = sorted(k for k in set(versions) | set(before) if versions.get(k) != before.get(k))
        if changed:
            self.record(ScenariosChanged(
                versions=versions, counts={k: len(v.scenarios) for k, v in catalog.sets.items()},
                changed=changed))
        self.scenario_versions = versions
        self.scenario_count = sum(len(v.scenarios) for v in catalog.sets.values())
        if self.status_error and self.status_error.startswith("scenario sets"):
            self.status_error = None
        return changed

    def status(self) -> ClusterStatus:
        cfg = self.cluster.config
        summary = self.last_summary
        composite = held_out = None
        if summary is not None:
            gate = summary.gates.get("composite")
            composite = gate.value if gate else None
            held = summary.gates.get("held_out")
            held_out = held.value if held else None
        return ClusterStatus(
            cluster=self.cluster.name,
            model=self.cluster.model_name,
            domain=cfg.domain,
            iteration=self.iteration,
            phase=self.phase,
            scenarios=self.scenario_count,
            scenario_sets=dict(self.scenario_versions),
            composite=composite,
            composite_threshold=cfg.thresholds.composite,
            held_out=held_out,
            held_out_threshold=cfg.thresholds.held_out,
            passed=summary.passed if summary else None,
            last_eval_tag=self.last_eval_tag,
            regressions=summary.regressions.count if summary else None,
            regressions_total=summary.regressions.compared if summary else None,
            champion=self.champion,
            pending_promotion=self.pending_promotion,
            status_error=self.status_error,
            inbox_left=[f"{name}: {detail}" for name, detail in sorted(self.inbox_left.items())],
        )


class Fleet:
    """``judge_engines``: the named engines a scenario's judge may name (besides ``cluster``);
    None accepts any name (a fleet opened without the daemon's config)."""

    def __init__(self, home: Path, *, judge_engines: frozenset[str] | None = None,
                 judge_models: Mapping[str, str] | None = None) -> None:
        self.home = home
        self.judge_engines = judge_engines
        self.judge_models = judge_models
        self.runtimes: dict[str, ClusterRuntime] = {}
        self.problems: list[ClusterProblem] = []

    def discover(self) -> None:
        clusters, self.problems = discover_clusters(self.home)
        self.runtimes = {name: ClusterRuntime(cluster=c, judge_engines=self.judge_engines,
                                              judge_models=self.judge_models)
                         for name, c in clusters.items()}

    def get(self, name: str) -> ClusterRuntime:
        try:
            return self.runtimes[name]
        except KeyError:
            known = ", ".join(sorted(self.runtimes)) or "none"
            raise NotFound(
                f"no cluster {name!r} under {self.home} (known: {known})", data={"cluster": name}
            ) from None

    def load_errors(self) -> list[ClusterLoadError]:
        return [
            ClusterLoadError(cluster=p.cluster, file=p.file, field=p.field, message=p.message)
            for p in self.problems
        ]

    def fleet_status(self, cluster: str | None = None) -> FleetStatus:
        runtimes = [self.get(cluster)] if cluster else list(self.runtimes.values())
        return FleetStatus(
            generated_at=utc_now().isoformat(timespec="seconds"),
            clusters=[r.status() for r in runtimes],
            errors=self.load_errors() if cluster is None else [],
        )

    def register(self, table: MethodTable) -> None:
        async def fleet_status(params: FleetParams, ctx: CallContext) -> FleetStatus:
            return self.fleet_status(params.cluster)

        async def cluster_status(params: ClusterParams, ctx: CallContext) -> ClusterStatus:
            return self.get(params.cluster).status()

        table.add("fleet.status", FleetParams, fleet_status, "Every cluster's phase and scores.", inline=True)
        table.add("cluster.status", ClusterParams, cluster_status, "One cluster's phase and scores.", inline=True)
