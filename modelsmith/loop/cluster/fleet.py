"""The fleet: every cluster the daemon found, its live runtime state, and the status methods."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from modelsmith.errors import ModelsmithError, NotFound, Unavailable
from modelsmith.loop.cluster.config import Cluster, ClusterProblem, discover_clusters
from modelsmith.loop.records.ledger import Ledger
from modelsmith.loop.scoring.scenarios import ScenarioCatalog, load_catalog
from modelsmith.rpc.dispatch import MethodTable
from modelsmith.rpc.schema.daemon import (
    ClusterLoadError,
    ClusterParams,
    ClusterStatus,
    FleetParams,
    FleetStatus,
)
from modelsmith.rpc.server import CallContext


@dataclass(eq=False)
class ClusterRuntime:
    """What the daemon knows about one cluster right now (rebuilt from its ledger at start)."""

    cluster: Cluster
    phase: str = "idle"
    iteration: int = 0
    scenario_count: int = 0
    scenario_versions: dict[str, str] = field(default_factory=dict)
    last_eval_tag: str | None = None
    last_summary: dict[str, Any] | None = None
    champion: str | None = None
    pending_promotion: str | None = None
    candidate: str | None = None
    status_error: str | None = None
    ledger: Ledger | None = None
    catalog: ScenarioCatalog | None = None

    def require_ledger(self) -> Ledger:
        if self.ledger is None:
            raise Unavailable(
                f"cluster {self.cluster.name} is not available: {self.status_error or 'not opened'}",
                data={"cluster": self.cluster.name},
            )
        return self.ledger

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
        """Open the ledger (verifying it) and the scenario catalog; rebuild state from the ledger.

        Blocking: call it from a worker thread. A bad ledger or scenario set leaves the cluster
        unavailable with ``status_error`` saying why; other clusters are not affected.
        """
        try:
            ledger = Ledger.open(self.cluster.ledger_path)
        except ModelsmithError as exc:
            self.phase = "failed"
            self.status_error = f"ledger does not verify: {exc.message}"
            return
        self.ledger = ledger
        restore_from_ledger(self, ledger)
        self.reload_scenarios()

    def reload_scenarios(self) -> list[str]:
        """Load the governed sets; a changed set version becomes a ledger event. Returns changed sets."""
        ledger = self.require_ledger()
        try:
            catalog = load_catalog(self.cluster.scenarios_dir)
        except ModelsmithError as exc:
            self.status_error = f"scenario sets do not load: {exc.message}"
            return []
        self.catalog = catalog
        versions = catalog.versions()
        recorded = ledger.last_of("scenarios.changed")
        before = dict(recorded.data.get("versions", {})) if recorded else {}
        changed = sorted(k for k in set(versions) | set(before) if versions.get(k) != before.get(k))
        if changed:
            ledger.append(
                "scenarios.changed",
                {"versions": versions, "counts": {k: len(v.scenarios) for k, v in catalog.sets.items()},
                 "changed": changed},
            )
        self.scenario_versions = versions
        self.scenario_count = sum(len(v.scenarios) for v in catalog.sets.values())
        if self.status_error and self.status_error.startswith("scenario sets"):
            self.status_error = None
        return changed

    def status(self) -> ClusterStatus:
        cfg = self.cluster.config
        summary = self.last_summary or {}
        gates = summary.get("gates", {})
        passed = summary.get("passed")
        return ClusterStatus(
            cluster=self.cluster.name,
            model=self.cluster.model_name,
            domain=cfg.domain,
            iteration=self.iteration,
            phase=self.phase,
            scenarios=self.scenario_count,
            scenario_sets=dict(self.scenario_versions),
            composite=gates.get("composite", {}).get("value"),
            composite_threshold=cfg.thresholds.composite,
            held_out=gates.get("held_out", {}).get("value"),
            held_out_threshold=cfg.thresholds.held_out,
            passed=passed,
            last_eval_tag=self.last_eval_tag,
            regressions=summary.get("regressions", {}).get("count"),
            regressions_total=summary.get("regressions", {}).get("compared"),
            champion=self.champion,
            pending_promotion=self.pending_promotion,
            status_error=self.status_error,
        )


def restore_from_ledger(runtime: ClusterRuntime, ledger: Ledger) -> None:
    """Rebuild iteration, champion, candidate, last eval and pending promotion from the ledger."""
    import msgspec

    for entry in ledger.entries():
        data = entry.data
        if entry.kind == "iteration.advanced":
            runtime.iteration = int(data["iteration"])
            runtime.candidate = str(data["adapter"])
        elif entry.kind == "eval.finished":
            runtime.last_eval_tag = str(data["tag"])
        elif entry.kind == "promotion.requested":
            runtime.pending_promotion = str(data["request_id"])
        elif entry.kind in ("promotion.approved", "promotion.rejected"):
            runtime.pending_promotion = None
            if entry.kind == "promotion.approved":
                runtime.champion = str(data["adapter"])
                if runtime.candidate == runtime.champion:
                    runtime.candidate = None
        elif entry.kind == "rollback.done":
            runtime.champion = data.get("adapter")
    if runtime.pending_promotion:
        runtime.phase = "awaiting_approval"
    if runtime.last_eval_tag:
        path = runtime.cluster.evals_dir() / runtime.last_eval_tag / "summary.json"
        try:
            runtime.last_summary = msgspec.json.decode(path.read_bytes())
        except (OSError, msgspec.DecodeError):
            runtime.last_summary = None


class Fleet:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.runtimes: dict[str, ClusterRuntime] = {}
        self.problems: list[ClusterProblem] = []

    def discover(self) -> None:
        clusters, self.problems = discover_clusters(self.home)
        self.runtimes = {name: ClusterRuntime(cluster=c) for name, c in clusters.items()}

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
            generated_at=datetime.now(UTC).isoformat(timespec="seconds"),
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
