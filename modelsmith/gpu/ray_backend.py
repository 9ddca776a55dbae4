"""The daemon's link to a Ray cluster: connect once, refuse what can never be placed, say where.

Ray decides where an engine actor or a trainer task runs; this module only checks, before
anything is submitted, that some alive node of the cluster has each resource a request names
(``CPU``, ``GPU``, ``memory``, custom ones) in the amount asked. Ray itself would queue an
infeasible request forever (it logs a warning); here it is :class:`Unplaceable` at once, naming
the missing resource. A request that fits a node but waits for one that is busy is not refused:
it waits in Ray's queue and its position is shown (:class:`PendingQueue`).

``ray`` is imported lazily, inside the functions: a daemon without ``[ray] address`` never
imports it. Blocking Ray calls (``ray.init``, ``ray.nodes``) run in a worker thread.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread

from modelsmith.errors import EngineError, Unavailable
from modelsmith.gpu.ray_config import RaySection

__all__ = [
    "PendingQueue",
    "Placement",
    "RayRequest",
    "Unplaceable",
    "check_placeable",
    "cluster_nodes",
    "connect",
    "current_placement",
    "describe_placements",
    "disconnect",
]

_GIB = 1024**3
_connect_lock = threading.Lock()


class Unplaceable(Unavailable):
    """The Ray cluster has no node that could ever run this request; ``data["resource"]`` names
    the resource missing, ``requested`` the amount, ``largest`` the most any alive node has."""


@dataclass(frozen=True, slots=True)
class RayRequest:
    """What one actor or task asks of the cluster: Ray's own resource names and amounts."""

    what: str  # "engine tiny-0", "trainer job-3": for the error message
    num_cpus: float
    num_gpus: float
    memory_bytes: int | None = None
    resources: Mapping[str, float] | None = None
    # GPUs taken by vLLM's Ray executor (tensor x pipeline parallel), one per bundle, anywhere.
    spread_gpus: int = 0
    # Copies of this request placed at once (Ray Train workers: one bundle each, any nodes).
    count: int = 1

    def as_ray(self) -> dict[str, float]:
        """The single-node resource dict Ray schedules the actor or task by."""
        wanted: dict[str, float] = {"CPU": self.num_cpus, "GPU": self.num_gpus}
        if self.memory_bytes:
            wanted["memory"] = float(self.memory_bytes)
        wanted.update(self.resources or {})
        return {name: amount for name, amount in wanted.items() if amount > 0}

    def options(self) -> dict[str, Any]:
        """Keyword options for ``ActorClass.options`` / ``remote_function.options``."""
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory_bytes:
            options["memory"] = self.memory_bytes
        if self.resources:
            options["resources"] = dict(self.resources)
        return options


def gib(amount: float | None) -> int | None:
    """GiB from the config as the bytes Ray's ``memory`` resource counts."""
    return None if amount is None else int(amount * _GIB)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where an actor or task runs: Ray's node id, the node's address, its GPU ids there."""

    node_id: str
    node_ip: str
    gpus: tuple[str, ...] = ()

    def describe(self) -> str:
        gpus = f" GPUs {','.join(self.gpus)}" if self.gpus else ""
        return f"node {self.node_id[:12]} ({self.node_ip}){gpus}"

    def shares_gpus_with(self, other: Placement) -> bool:
        """Same node and at least one GPU id in common (Ray gives fractional GPUs on one
        device the same id): the sleep/wake rule of one box, per node."""
        return self.node_id == other.node_id and bool(set(self.gpus) & set(other.gpus))


def describe_placements(placements: Placement | Sequence[Placement]) -> str:
    """One placement as :meth:`Placement.describe`; several (Ray Train workers) by rank."""
    if isinstance(placements, Placement):
        return placements.describe()
    if len(placements) == 1:
        return placements[0].describe()
    return f"{len(placements)} workers: " + "; ".join(
        f"rank {rank} on {p.describe()}" for rank, p in enumerate(placements))


def current_placement() -> Placement:
    """Inside an actor or task: the node it got and the GPU ids Ray gave it."""
    import ray

    context = ray.get_runtime_context()
    gpus = tuple(str(g) for g in context.get_accelerator_ids().get("GPU", []))
    node_ip: str = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
    return Placement(node_id=context.get_node_id(), node_ip=node_ip, gpus=gpus)


def _connect_blocking(config: RaySection) -> None:
    # The daemon owns its signals: Ray's C++ failure-signal handler would turn the SIGTERM of a
    # clean stop (systemd, the tests) into an abort (exit -6) after the daemon's own handler ran.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    import ray

    with _connect_lock:
        if ray.is_initialized():
            return
        ray.init(address=config.address, namespace=config.namespace,
                 runtime_env=config.runtime_env.as_ray() or None, log_to_driver=False,
                 configure_logging=False)


async def connect(config: RaySection) -> None:
    """Join the cluster of ``[ray] address`` once per process (a no-op when connected already);
    EngineError (reason "ray") when it cannot be reached within ``connect_timeout_s``."""
    if config.address is None:
        raise EngineError("Ray is off in this daemon ([ray] address is not set)",
                          data={"field": "ray.address"})
    try:
        with anyio.fail_after(config.connect_timeout_s):
            await anyio.to_thread.run_sync(_connect_blocking, config, abandon_on_cancel=True)
    except TimeoutError as exc:
        raise EngineError(f"Ray cluster {config.address} not reached within "
                          f"{config.connect_timeout_s:g} s",
                          data={"address": config.address, "reason": "ray"}) from exc
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise EngineError(f"Ray cluster {config.address} not reached: {exc}",
                          data={"address": config.address, "reason": "ray"}) from exc


def disconnect() -> None:
    """Leave the cluster (the daemon's actors die with this driver); a no-op when never joined.
    Blocking: run it in a worker thread."""
    import sys

    ray = sys.modules.get("ray")
    with _connect_lock:
        if ray is not None and ray.is_initialized():
            ray.shutdown()


def cluster_nodes() -> list[dict[str, Any]]:
    """The alive nodes of the connected cluster: ``{"node_id", "ip", "resources"}`` (totals)."""
    import ray

    return [{"node_id": node["NodeID"], "ip": node.get("NodeManagerAddress", ""),
             "resources": dict(node.get("Resources", {}))}
            for node in ray.nodes() if node.get("Alive")]  # type: ignore[no-untyped-call]


def check_placeable(request: RayRequest, nodes: list[dict[str, Any]]) -> None:
    """Unplaceable unless one alive node has every resource of ``request`` in the amount asked
    (and the cluster has ``spread_gpus`` GPUs in all, for vLLM's own placement group)."""
    wanted = request.as_ray()
    if not nodes:
        raise Unplaceable(f"{request.what}: the Ray cluster has no alive node",
                          data={"what": request.what, "resource": "node", "requested": 1,
                                "largest": 0, "reason": "unplaceable"})
    if not any(all(node["resources"].get(name, 0.0) >= amount for name, amount in wanted.items())
               for node in nodes):
        # Name the first resource no node has enough of; else the combination is what is missing.
        for name, amount in wanted.items():
            largest = max(node["resources"].get(name, 0.0) for node in nodes)
            if largest < amount:
                break
        else:
            name, amount, largest = "+".join(wanted), math.nan, math.nan
        shown = _amount(name, amount)
        raise Unplaceable(
            f"{request.what} needs {shown} {name} on one node and no node of the Ray cluster "
            f"has it (the most any node has: {_amount(name, largest)}); it would wait forever",
            data={"what": request.what, "resource": name, "requested": _number(amount),
                  "largest": _number(largest), "reason": "unplaceable"})
    if request.count > 1:
        fits = sum(_copies(node["resources"], wanted) for node in nodes)
        if fits < request.count:
            raise Unplaceable(
                f"{request.what} needs {request.count} workers of {_shown(wanted)} each and the "
                f"Ray cluster can hold {fits} at once; it would wait forever",
                data={"what": request.what, "resource": "workers", "requested": request.count,
                      "largest": fits, "per_worker": wanted, "reason": "unplaceable"})
    if request.spread_gpus:
        total = sum(node["resources"].get("GPU", 0.0) for node in nodes)
        if total < request.spread_gpus:
            raise Unplaceable(
                f"{request.what} spans {request.spread_gpus} GPUs (tensor x pipeline parallel) "
                f"and the Ray cluster has {total:g}",
                data={"what": request.what, "resource": "GPU", "requested": request.spread_gpus,
                      "largest": total, "reason": "unplaceable"})


def _copies(resources: Mapping[str, float], wanted: Mapping[str, float]) -> int:
    """How many bundles of ``wanted`` one node's totals hold."""
    counts = [math.floor(resources.get(name, 0.0) / amount + 1e-9)
              for name, amount in wanted.items() if amount > 0]
    return min(counts) if counts else 1 << 30


def _shown(wanted: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{name}: {_amount(name, amount)}" for name, amount in wanted.items()) + "}"


def _number(value: float) -> float | None:
    return None if math.isnan(value) else value


def _amount(name: str, value: float) -> str:
    if math.isnan(value):
        return "all of"
    return f"{value / _GIB:g} GiB" if name == "memory" else f"{value:g}"


async def ensure_placeable(request: RayRequest) -> None:
    """:func:`check_placeable` against the cluster as it is now (``ray.nodes`` off the loop)."""
    nodes = await anyio.to_thread.run_sync(cluster_nodes)
    check_placeable(request, nodes)


class PendingQueue:
    """Requests submitted to Ray and not yet placed, in submission order: a waiting job's
    position (1 = next) for status displays. Ray's scheduler decides the real order."""

    def __init__(self) -> None:
        self._waiting: list[str] = []
        self._watchers: dict[str, Callable[[int | None], None]] = {}

    def add(self, what: str, on_position: Callable[[int | None], None] | None = None) -> None:
        """Queue ``what``; ``on_position`` hears its position now and whenever it moves up."""
        self._waiting.append(what)
        if on_position is not None:
            self._watchers[what] = on_position
            on_position(self.position(what))

    def placed(self, what: str) -> None:
        """``what`` left the queue (placed, refused or cancelled): the others move up."""
        if what not in self._waiting:
            return
        self._waiting.remove(what)
        watcher = self._watchers.pop(what, None)
        if watcher is not None:
            watcher(None)
        for other, notify in list(self._watchers.items()):
            notify(self.position(other))

    def position(self, what: str) -> int | None:
        return self._waiting.index(what) + 1 if what in self._waiting else None

    def waiting(self) -> list[str]:
        return list(self._waiting)
