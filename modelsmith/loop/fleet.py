"""The fleet: every cluster the daemon found, its live runtime state, and the status methods."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from modelsmith.errors import NotFound
from modelsmith.loop.cluster import Cluster, ClusterProblem, discover_clusters
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
    status_error: str | None = None

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

        table.add("fleet.status", FleetParams, fleet_status, "Every cluster's phase and scores.")
        table.add("cluster.status", ClusterParams, cluster_status, "One cluster's phase and scores.")
