"""The daemon: wires the services together and owns their lifetimes.

Start-up order: config -> clusters -> socket -> services -> READY=1. Shutdown (SIGTERM/SIGINT):
STOPPING=1, stop accepting, give running jobs ``shutdown_grace_s``, cancel what is left, close
engines (shielded, bounded), remove the socket file we created.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import anyio
import anyio.abc
import structlog

from modelsmith import __version__
from modelsmith.daemon.config import DaemonConfig
from modelsmith.daemon.listener import bind_unix_socket, inherited_socket
from modelsmith.daemon.sdnotify import Notifier, listen_fds, watchdog_interval
from modelsmith.errors import EngineError
from modelsmith.gpu import engine_reaper
from modelsmith.gpu.engine import Engine
from modelsmith.gpu.engine_reaper import stop_leftover_engines
from modelsmith.gpu.engines import EngineFactory, EnginePool, EngineSpec, default_engine_factory
from modelsmith.gpu.leases import LeaseManager
from modelsmith.gpu.named_engines import NamedEngines
from modelsmith.loop.autonomy.inbox import InboxWatcher
from modelsmith.loop.autonomy.service import LoopService
from modelsmith.loop.cluster.config import Cluster
from modelsmith.loop.cluster.fleet import Fleet
from modelsmith.loop.eval.judge_check import JudgeService, engine_models
from modelsmith.loop.eval.service import EvalService
from modelsmith.loop.graders.service import register_grader_methods
from modelsmith.loop.jobs.methods import register_job_methods
from modelsmith.loop.jobs.registry import JobRegistry
from modelsmith.loop.promotion.service import PromotionService
from modelsmith.loop.synth.service import SynthService
from modelsmith.loop.train.service import TrainService
from modelsmith.rpc.dispatch import Empty, MethodTable
from modelsmith.rpc.peercred import PeerPolicy
from modelsmith.rpc.schema.daemon import DaemonStatus, PingResult
from modelsmith.rpc.server import CallContext, RpcServer, ServerLimits

log = structlog.get_logger("modelsmith.daemon")


def engine_spec_for(cluster: Cluster) -> EngineSpec:
    """The engine a cluster's ``[model]`` and ``[engine]`` sections ask for, as the pool reads it."""
    model, engine = cluster.config.model, cluster.config.engine
    return EngineSpec(
        model=cluster.base_model,
        kind=engine.kind,
        dtype=model.dtype,
        max_model_len=model.max_model_len,
        url=engine.url,
        api_key_env=engine.api_key_env,
        gpu_memory_utilization=engine.gpu_memory_utilization,
        tensor_parallel_size=engine.tensor_parallel_size,
        max_lora_rank=engine.max_lora_rank,
        max_loras=engine.max_loras,
        served_model=engine.model,
    )


@dataclass
class Daemon:
    home: Path
    socket_path: Path
    config: DaemonConfig
    notifier: Notifier = field(default_factory=Notifier)
    table: MethodTable = field(default_factory=MethodTable)
    jobs: JobRegistry = field(default_factory=JobRegistry)
    started_monotonic: float = field(default_factory=time.monotonic)
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def __post_init__(self) -> None:
        self.fleet = Fleet(self.home, judge_engines=frozenset(self.config.engines),
                           judge_models=engine_models(self.config.engines, self.home))
        self.engines = EnginePool(self._engine_factory())
        # [engines.NAME]: a vLLM one is the pool's (one warm engine per base model, shared
        # with the clusters on it); OpenAI-compatible ones the registry runs itself.
        self.named = NamedEngines.from_config(self.config, home=self.home,
                                              vllm_provider=self._named_vllm)
        self._reaper: tuple[subprocess.Popen[bytes], int] | None = None  # watcher, pipe
        self.evals = EvalService(self.fleet, self.jobs, self.engines, self.named)
        self.leases = LeaseManager()
        self.training = TrainService(self.fleet, self.jobs, self.engines, self.evals, self.leases)
        if self.config.ray.enabled:  # training jobs as Ray actors (docs/scale.md)
            from modelsmith.gpu.ray_trainer import RayTrainerRunner

            self.training.ray_trainer = RayTrainerRunner(self.config.ray)
        self.promotions = PromotionService(self.fleet, self.engines, self.home)
        self.synth = SynthService(self.fleet, self.jobs, self.engines, self.named, self.home)
        self.judges = JudgeService(self.fleet, self.jobs, self.engines, self.named,
                                   self.fleet.judge_models)
        self.loops = LoopService(self.fleet, self.jobs, self.evals, self.training, self.promotions,
                                 self.synth)
        self.inbox = InboxWatcher(self.fleet, self.loops.trigger)
        self._shutdown = anyio.Event()

    def _engine_factory(self) -> EngineFactory:
        """In-process engines; with ``[ray] address``, vLLM engines in Ray actors
        (modelsmith.gpu.ray_engine, imported only then: no Ray otherwise)."""
        if not self.config.ray.enabled:
            return default_engine_factory
        from modelsmith.gpu.ray_engine import ray_engine_factory

        return ray_engine_factory(self.config.ray, default_engine_factory)

    def _named_vllm(self, name: str, spec: EngineSpec) -> Engine:
        if not self.config.start_engines:
            raise EngineError(f"engine {name!r} is a local vLLM engine and engines are off in "
                              "this daemon (start_engines = false)", data={"engine": name})
        return self.engines.add_named(name, spec)

    # -- RPC methods of the daemon itself -------------------------------------------------
    def _register(self) -> None:
        async def ping(params: Empty, ctx: CallContext) -> PingResult:
            return PingResult(version=__version__, time=time.time())

        async def status(params: Empty, ctx: CallContext) -> DaemonStatus:
            return self.status()

        self.table.add("daemon.ping", Empty, ping, "Liveness check.", inline=True)
        self.table.add("daemon.status", Empty, status, "Version, uptime, engines, jobs.", inline=True)
        self.fleet.register(self.table)
        register_job_methods(self.table, self.jobs)
        self.evals.register(self.table)
        self.training.register(self.table)
        self.promotions.register(self.table)
        self.synth.register(self.table)
        self.judges.register(self.table)
        self.loops.register(self.table)
        register_grader_methods(self.table, self.fleet)

    def status(self) -> DaemonStatus:
        return DaemonStatus(
            version=__version__,
            pid=os.getpid(),
            uptime_s=round(time.monotonic() - self.started_monotonic, 3),
            started_at=self.started_at,
            home=str(self.home),
            socket=str(self.socket_path),
            clusters=len(self.fleet.runtimes),
            engines=self.engines.statuses(self.leases.memory_mb),
            jobs=[j.summary() for j in self.jobs.active()],
            cluster_errors=self.fleet.load_errors(),
        )

    def request_shutdown(self) -> None:
        self._shutdown.set()

    # -- lifecycle -------------------------------------------------------------------------
    def _open_listener_socket(self) -> tuple[object, bool]:
        fds = listen_fds()
        if fds:
            return inherited_socket(fds[0]), False
        return bind_unix_socket(self.socket_path, group=self.config.socket_group), True

    async def run(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.notifier.status("discovering clusters")
        self.fleet.discover()
        for problem in self.fleet.problems:
            log.error("cluster not loaded", cluster=problem.cluster, file=problem.file,
                      field=problem.field, error=problem.message)
        self._register()
        if self.config.start_engines:
            # An engine core left by a daemon of this home that was killed still holds memory.
            stopped = await anyio.to_thread.run_sync(stop_leftover_engines, self.home)
            if stopped:
                log.warning("stopped leftover engine processes", pids=stopped)
            engine_reaper.mark_children(self.home)
            self._reaper = engine_reaper.start_watcher(self.home)
        # Verify every cluster's ledger and scenario sets before READY; a bad one fails alone.
        for runtime in self.fleet.runtimes.values():
            self.notifier.status(f"verifying cluster {runtime.cluster.name}")
            await anyio.to_thread.run_sync(runtime.open)
            await anyio.to_thread.run_sync(self.synth.recover, runtime)
            if runtime.status_error:
                log.error("cluster unavailable", cluster=runtime.cluster.name, error=runtime.status_error)
            if self.config.start_engines and runtime.ledger is not None:
                self.engines.add_cluster(runtime.cluster.name, engine_spec_for(runtime.cluster))
        # Cluster specs first (their LoRA limits build a shared engine), then the named vLLM
        # engines, all before the pool runs, so it starts them all.
        if self.config.start_engines:
            for name in self.named.vllm_specs():
                self.named.get(name)
        # Every local engine is a resident of the devices it spans: it sleeps for a trainer there.
        for gate, tensor_parallel_size in self.engines.residents():
            gate.devices = self.leases.add_engine(gate, tensor_parallel_size)
        raw_sock, owns_path = self._open_listener_socket()
        bound_inode = self.socket_path.stat().st_ino if owns_path else None
        listener = await anyio.abc.SocketListener.from_socket(raw_sock)  # type: ignore[arg-type]
        server = RpcServer(
            self.table,
            policy=PeerPolicy.for_current_process(self.config.allowed_groups),
            limits=ServerLimits(
                max_frame=self.config.max_frame_bytes,
                read_timeout=self.config.read_timeout_s,
                idle_timeout=self.config.idle_timeout_s,
                max_inflight=self.config.max_inflight_per_connection,
                max_connections=self.config.max_connections,
                max_connections_per_uid=self.config.max_connections_per_uid,
            ),
        )
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch_signals, name="signals")
                await tg.start(self.jobs.run)
                # Engines load in the background (state "loading"); systemd is told to wait.
                self.notifier.extend_timeout(300)
                await tg.start(self.engines.run)
                await tg.start(self.named.run)
                # The recorded champions are loaded again and checked by their canaries.
                tg.start_soon(self.promotions.restore_champions, name="champions")
                # Supervisors restore their recorded state and resume interrupted jobs.
                await tg.start(self.loops.run)
                await tg.start(self.inbox.run)
                serve_scope = anyio.CancelScope()
                tg.start_soon(self._serve_until_cancelled, server, listener, serve_scope)
                ready = f"serving {len(self.fleet.runtimes)} cluster(s) on {self.socket_path}"
                self.notifier.ready(ready)
                log.info("daemon ready", socket=str(self.socket_path), home=str(self.home),
                         clusters=sorted(self.fleet.runtimes), pid=os.getpid())
                interval = watchdog_interval()
                if interval:
                    tg.start_soon(self._watchdog, interval, name="watchdog")
                await self._shutdown.wait()
                self.notifier.stopping("stopping: waiting for running jobs")
                log.info("daemon stopping", active_jobs=len(self.jobs.active()))
                serve_scope.cancel()
                # Running jobs are cancelled now; their own cleanup (a trainer's checkpoint, a
                # final ledger entry) gets the grace period, then everything left is cut.
                active = self.jobs.active()
                for job in active:
                    self.jobs.cancel(job.job_id)
                with anyio.move_on_after(self.config.shutdown_grace_s):
                    for job in active:
                        await job.wait_finished()
                tg.cancel_scope.cancel()
        finally:
            # Remove the socket file only if it is still ours: a successor may have bound anew.
            with contextlib.suppress(FileNotFoundError):
                if owns_path and self.socket_path.stat().st_ino == bound_inode:
                    self.socket_path.unlink()
            if self.config.ray.enabled:  # the engine actors are gone now: leave the cluster
                from modelsmith.gpu.ray_backend import disconnect

                with anyio.CancelScope(shield=True), anyio.move_on_after(30):
                    await anyio.to_thread.run_sync(disconnect, abandon_on_cancel=True)
            log.info("daemon stopped")
            self.notifier.close()

    async def _serve_until_cancelled(
        self, server: RpcServer, listener: anyio.abc.SocketListener, scope: anyio.CancelScope
    ) -> None:
        with scope:
            await server.serve(listener)

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal received", signal=signal.Signals(signum).name)
                self.request_shutdown()

    async def _watchdog(self, interval: float) -> None:
        # Pinged from the event loop itself: a blocked loop stops the pings and systemd restarts us.
        while True:
            self.notifier.watchdog()
            await anyio.sleep(interval)
