"""The engine pool: one warm engine per distinct base model, shared by the clusters that use it.

The pool is a service (``await tg.start(pool.run)``): it starts every engine in its own task
group and returns at once; engines load in the background (state ``loading``) and are restarted
by their own ``run`` when they die. Clusters look their engine up by name.

Engines and trainers share GPUs through an :class:`EngineGate` per engine: the lease manager
(:mod:`modelsmith.gpu.leases`) holds the gate as a *resident* of the engine's devices and puts
it to sleep for a trainer; every user of the engine (an eval, an adapter load) goes through
:meth:`EnginePool.serving`, which waits while the engine sleeps (bounded: ``wait_awake_s``, an
hour by default, then EngineError with ``reason`` "asleep") and keeps it awake while in use. A
sleep first waits for the users in flight to finish (bounded: ``drain_timeout_s``, then the
trainer's lease fails with EngineError ``reason`` "busy"), so no request meets a sleeping engine.

The pool knows nothing of cluster configs: the daemon describes each cluster's engine with an
:class:`EngineSpec` (``modelsmith.daemon.app.engine_spec_for``), so gpu/ never imports loop/.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.abc
import structlog

from modelsmith.errors import EngineError, NotFound
from modelsmith.gpu.engine import Engine, EngineState
from modelsmith.rpc.schema.daemon import EngineStatus

__all__ = [
    "DRAIN_TIMEOUT_S",
    "SLEEP_TIMEOUT_S",
    "WAIT_AWAKE_S",
    "EngineFactory",
    "EngineGate",
    "EnginePool",
    "EngineSpec",
    "default_engine_factory",
]

log = structlog.get_logger("modelsmith.engines")

WAIT_AWAKE_S = 3600.0
"""How long a user (an eval) waits for its engine to load or wake before EngineError."""
DRAIN_TIMEOUT_S = 600.0
"""How long a sleep waits for the requests in flight before the trainer's lease fails."""
SLEEP_TIMEOUT_S = 120.0
"""Bound on one engine's own sleep() call."""

# The gates the current task holds: serving() is re-entrant for the task that holds the engine
# awake (an eval that loads its adapter), which would otherwise wait for a sleep it blocks.
_held_gates: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "modelsmith_held_gates", default=frozenset())


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineSpec:
    """What one cluster asks of its engine: the model and how to serve it.

    ``model`` is the local base model directory. For ``kind == "openai"``, ``served_model`` is
    the name sent to the server at ``url`` as the request's ``model`` (``[engine] model``, as in
    ``--served-model-name``); without it the directory's path is sent. The vLLM settings are
    ignored by the OpenAI engine, and ``served_model`` by the vLLM one.
    """

    model: Path
    kind: Literal["vllm", "openai"]
    dtype: str
    max_model_len: int
    url: str | None
    api_key_env: str | None
    gpu_memory_utilization: float
    tensor_parallel_size: int
    max_lora_rank: int
    max_loras: int
    served_model: str | None = None

    @property
    def openai_model(self) -> str:
        """The ``model`` field an OpenAI-compatible server is asked for."""
        return self.served_model if self.served_model is not None else str(self.model)

    @property
    def key(self) -> str:
        """Clusters whose specs have the same key share one engine (the first spec builds it)."""
        if self.kind == "openai":
            return f"openai:{self.url}:{self.openai_model}"
        return f"vllm:{self.model}"


EngineFactory = Callable[[str, EngineSpec], Engine]
"""Builds the engine named ``name`` for a spec (tests put a fake at this hardware boundary)."""


def default_engine_factory(name: str, spec: EngineSpec) -> Engine:
    """Build the engine a spec asks for (vLLM in-process, or OpenAI-compatible HTTP)."""
    if spec.kind == "openai":
        from modelsmith.gpu.openai_engine import OpenAIEngine

        if not spec.url:
            raise EngineError(f"engine {name}: a url is required for kind 'openai'")
        return OpenAIEngine(name, spec.url, spec.openai_model, api_key_env=spec.api_key_env)
    from modelsmith.gpu.vllm_engine import VllmEngine

    return VllmEngine(
        name,
        spec.model,
        max_model_len=spec.max_model_len,
        max_lora_rank=spec.max_lora_rank,
        max_loras=spec.max_loras,
        gpu_memory_utilization=spec.gpu_memory_utilization,
        tensor_parallel_size=spec.tensor_parallel_size,
        dtype=spec.dtype,
    )


class EngineGate:
    """One engine's sleep for trainers and wakefulness for its users (a lease ``Resident``).

    Lives on the event loop: its counters change only there, so no lock is needed.
    """

    def __init__(self, engine: Engine, *, drain_timeout_s: float = DRAIN_TIMEOUT_S,
                 sleep_timeout_s: float = SLEEP_TIMEOUT_S) -> None:
        self.engine = engine
        self.name = engine.info().name
        self.devices: list[int] = []  # set when the daemon makes it a resident
        self.users = 0
        self.asleep = False  # a trainer asked for the device: sleeping, or draining to sleep
        self._drain_timeout_s = drain_timeout_s
        self._sleep_timeout_s = sleep_timeout_s
        self._changed: anyio.Event | None = None

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def _wait_changed(self) -> None:
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()

    async def sleep(self, level: int = 1) -> None:
        """Stop new users, wait for those in flight (bounded), then sleep the engine.

        EngineError (reason "busy") when users remain after ``drain_timeout_s``; an engine
        that is loading is waited for; one that is cold or dead holds no memory and is left.
        """
        self.asleep = True
        self._notify()
        try:
            with anyio.fail_after(self._drain_timeout_s):
                while self.users:
                    await self._wait_changed()
        except TimeoutError as exc:
            self.asleep = False
            self._notify()
            raise EngineError(
                f"engine {self.name!r} still served {self.users} request(s) after "
                f"{self._drain_timeout_s:g} s; it cannot sleep for the trainer now",
                data={"engine": self.name, "reason": "busy"}) from exc
        with anyio.move_on_after(self._sleep_timeout_s) as scope:
            try:
                if self.engine.info().state is EngineState.LOADING:
                    await self.engine.wait_ready(self._sleep_timeout_s)
                if self.engine.info().state is EngineState.WARM:
                    await self.engine.sleep(level)
            except EngineError as exc:
                log.warning("engine did not sleep", engine=self.name, error=exc.message)
        if scope.cancelled_caught:
            log.error("engine did not sleep in time", engine=self.name,
                      timeout_s=self._sleep_timeout_s)

    async def wake_up(self) -> None:
        """Wake the engine and let its users in again (even when the wake fails)."""
        try:
            if self.engine.info().state is EngineState.SLEEPING:
                await self.engine.wake_up()
        finally:
            self.asleep = False
            self._notify()

    async def wait_awake(self, timeout: float) -> None:  # noqa: ASYNC109 (bounded by contract)
        """Return once the engine is warm and no trainer holds it asleep; EngineError after
        ``timeout`` seconds (reason "asleep" while it sleeps)."""
        try:
            with anyio.fail_after(timeout):
                while True:
                    while self.asleep:
                        await self._wait_changed()
                    await self.engine.wait_ready(timeout)
                    if not self.asleep:
                        return
        except TimeoutError as exc:
            raise EngineError(
                f"engine {self.name!r} slept for a trainer longer than {timeout:g} s",
                data={"engine": self.name, "state": self.engine.info().state.value,
                      "reason": "asleep"}) from exc

    @asynccontextmanager
    async def serving(self, timeout: float) -> AsyncIterator[Engine]:  # noqa: ASYNC109
        """Hold the engine awake for the block (after :meth:`wait_awake`); re-entrant."""
        held = _held_gates.get()
        if id(self) in held:
            yield self.engine
            return
        await self.wait_awake(timeout)
        self.users += 1
        token = _held_gates.set(held | {id(self)})
        try:
            yield self.engine
        finally:
            _held_gates.reset(token)
            self.users -= 1
            self._notify()


class EnginePool:
    def __init__(self, factory: EngineFactory = default_engine_factory, *,
                 wait_awake_s: float = WAIT_AWAKE_S, drain_timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        self._factory = factory
        self.wait_awake_s = wait_awake_s
        self._drain_timeout_s = drain_timeout_s
        self._engines: dict[str, Engine] = {}
        self._gates: dict[str, EngineGate] = {}
        self._specs: dict[str, EngineSpec] = {}
        self._by_cluster: dict[str, str] = {}
        self._by_named: dict[str, str] = {}  # named engines ([engines.NAME]) the pool runs
        self._loaded_adapters: dict[str, dict[str, Path]] = {}

    def add_cluster(self, cluster: str, spec: EngineSpec) -> None:
        """Give cluster ``cluster`` the engine for ``spec``, building it unless one is shared."""
        if spec.kind == "openai" and not spec.url:
            raise EngineError(f"cluster {cluster}: engine.url is required for kind 'openai'",
                              data={"cluster": cluster})
        key = spec.key
        if key not in self._engines:
            name = f"{spec.model.name}-{len(self._engines)}"
            engine = self._factory(name, spec)
            self._engines[key] = engine
            self._gates[key] = EngineGate(engine, drain_timeout_s=self._drain_timeout_s)
            self._specs[key] = spec
            self._loaded_adapters[key] = {}
        self._by_cluster[cluster] = key

    def add_named(self, name: str, spec: EngineSpec) -> Engine:
        """Give the named engine ``name`` (``[engines.NAME]``, kind vllm) the engine for
        ``spec``, sharing the warm engine of any cluster on the same base model; returns it.

        Register before :meth:`run` (the pool starts the engines it has then). Its users go
        through :meth:`serving_named`, so it sleeps for trainers like a cluster's engine.
        """
        key = spec.key
        if key not in self._engines:
            engine = self._factory(f"{spec.model.name}-{len(self._engines)}", spec)
            self._engines[key] = engine
            self._gates[key] = EngineGate(engine, drain_timeout_s=self._drain_timeout_s)
            self._specs[key] = spec
            self._loaded_adapters[key] = {}
        self._by_named[name] = key
        return self._engines[key]

    def named_gate(self, name: str) -> EngineGate | None:
        """The gate of a named engine the pool runs (:meth:`add_named`); None otherwise."""
        key = self._by_named.get(name)
        return None if key is None else self._gates[key]

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            for engine in self._engines.values():
                await tg.start(engine.run)
            task_status.started()

    def engine_for(self, cluster: str) -> Engine:
        key = self._by_cluster.get(cluster)
        if key is None:
            raise EngineError(f"cluster {cluster} has no engine (engines are off in this daemon)",
                              data={"cluster": cluster})
        return self._engines[key]

    def residents(self) -> list[tuple[EngineGate, int]]:
        """The gates of engines that live on this box's devices, with the GPUs each spans
        (``tensor_parallel_size``); OpenAI-compatible engines and engines in Ray actors
        (kind "vllm-ray") live elsewhere."""
        return [(self._gates[key], spec.tensor_parallel_size)
                for key, spec in self._specs.items()
                if spec.kind == "vllm" and self._engines[key].info().kind == "vllm"]

    def co_located(self, placement: Any) -> list[EngineGate]:
        """The gates of engines in Ray actors (kind "vllm-ray") that share a GPU with a
        trainer's ``placement`` (a :class:`~modelsmith.gpu.ray_backend.Placement`): they sleep
        while it trains, as residents of one box's GPU do (docs/scale.md)."""
        found = []
        for key, engine in self._engines.items():
            where = getattr(engine, "placement", None)
            if engine.info().kind == "vllm-ray" and where is not None \
                    and placement.shares_gpus_with(where):
                found.append(self._gates[key])
        return found

    def gate_for(self, cluster: str) -> EngineGate:
        self.engine_for(cluster)  # the typed error for a cluster without an engine
        return self._gates[self._by_cluster[cluster]]

    @asynccontextmanager
    async def serving(self, cluster: str, *, timeout: float | None = None  # noqa: ASYNC109
                      ) -> AsyncIterator[Engine]:
        """The cluster's engine, held awake for the block: waits while it loads or sleeps for a
        trainer (``timeout``, default ``wait_awake_s``; then EngineError)."""
        async with self.gate_for(cluster).serving(self.wait_awake_s if timeout is None else timeout) as engine:
            yield engine

    async def wait_awake(self, cluster: str, *, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Return once the cluster's engine is warm and not asleep for a trainer."""
        await self.gate_for(cluster).wait_awake(self.wait_awake_s if timeout is None else timeout)

    async def ensure_adapter(self, cluster: str, name: str, path: Path) -> str:
        """Load ``path`` into the cluster's engine as ``cluster:name`` unless it is there already
        (waiting, like :meth:`serving`, while the engine sleeps)."""
        key = self._by_cluster[cluster]
        adapter = f"{cluster}:{name}"
        loaded = self._loaded_adapters[key]
        if loaded.get(adapter) != path:
            async with self.serving(cluster) as engine:
                await engine.load_adapter(adapter, path)
            loaded[adapter] = path
        return adapter

    async def unload_adapter(self, cluster: str, name: str) -> None:
        """Unload ``cluster:name`` from the cluster's engine (if loaded) and forget it, so the
        next :meth:`ensure_adapter` loads it again (used when its canaries fail)."""
        key = self._by_cluster[cluster]
        adapter = f"{cluster}:{name}"
        if self._loaded_adapters[key].pop(adapter, None) is not None:
            with contextlib.suppress(NotFound):
                await self._engines[key].unload_adapter(adapter)

    def statuses(self, memory_mb: Callable[[int | None, Collection[int]], int | None] | None = None
                 ) -> list[EngineStatus]:
        """Every engine's status; ``memory_mb(pid, devices)`` (the lease manager's NVML query)
        fills in the device memory each uses."""
        out: list[EngineStatus] = []
        for key, engine in self._engines.items():
            info = engine.info()
            gate = self._gates[key]
            out.append(
                EngineStatus(
                    name=info.name,
                    kind=info.kind,
                    model=info.model,
                    state=info.state.value,
                    load_seconds=info.load_seconds,
                    restarts=info.restarts,
                    adapters=list(info.adapters),
                    last_error=info.last_error,
                    pid=info.pid,
                    devices=list(gate.devices),
                    memory_mb=memory_mb(info.pid, gate.devices) if memory_mb and gate.devices else None,
                    users=gate.users,
                    node=info.node,
                    node_gpus=list(info.node_gpus),
                )
            )
        return out
