"""daemon.*, fleet.* and cluster.* params and results."""

from __future__ import annotations

import msgspec

from modelsmith.rpc.dispatch import QueryParams
from modelsmith.rpc.schema.jobs import JobSummary


class PingResult(msgspec.Struct, kw_only=True):
    pong: bool = True
    version: str
    time: float


class EngineStatus(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One engine. ``state`` is "sleeping" while a trainer holds its GPU; ``devices`` are the
    device indices it lives on and ``memory_mb`` what its processes use there (NVML; absent on
    the CPU); ``users`` the evals and adapter loads holding it awake now; ``node`` and
    ``node_gpus`` where Ray placed it (``[ray]``: docs/scale.md)."""

    name: str
    kind: str
    model: str
    state: str
    load_seconds: float | None = None
    restarts: int = 0
    adapters: list[str] = []
    last_error: str | None = None
    pid: int | None = None
    devices: list[int] = []
    memory_mb: int | None = None
    users: int = 0
    node: str | None = None
    node_gpus: list[str] = []


class ClusterLoadError(msgspec.Struct, kw_only=True):
    """A cluster that could not be loaded: which file, which field, why."""

    cluster: str
    file: str
    field: str | None
    message: str


class DaemonStatus(msgspec.Struct, kw_only=True):
    version: str
    pid: int
    uptime_s: float
    started_at: str
    home: str
    socket: str
    clusters: int
    engines: list[EngineStatus]
    jobs: list[JobSummary]
    cluster_errors: list[ClusterLoadError]


class ClusterParams(QueryParams):
    cluster: str


class FleetParams(QueryParams):
    cluster: str | None = None


class ClusterStatus(msgspec.Struct, kw_only=True):
    """One cluster's state, as the seed's status block shows it."""

    cluster: str
    model: str
    domain: str
    iteration: int
    phase: str
    scenarios: int
    scenario_sets: dict[str, str]
    composite: float | None
    composite_threshold: float
    held_out: float | None
    held_out_threshold: float
    passed: bool | None
    last_eval_tag: str | None
    regressions: int | None
    regressions_total: int | None
    champion: str | None
    pending_promotion: str | None
    status_error: str | None = None
    inbox_left: list[str] = []  # drops left in the inbox: not even rejected/ could take them


class FleetStatus(msgspec.Struct, kw_only=True):
    generated_at: str
    clusters: list[ClusterStatus]
    errors: list[ClusterLoadError]
