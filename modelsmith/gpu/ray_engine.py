"""An :class:`~modelsmith.gpu.engine.Engine` whose vLLM runs in a Ray actor on some node.

Daemon side, :class:`RayEngine` is an Engine like any other (the pool, the gates, evals and the
canary replay use it unchanged); its :meth:`RayEngine.run` connects to the cluster, refuses an
actor no node could ever hold (:class:`~modelsmith.gpu.ray_backend.Unplaceable`, the engine
stays dead with that error), starts the actor, mirrors its engine's state, and starts a new
actor after an exponential backoff when the actor (its process or its node) dies. Adapters that
were loaded are loaded into the new actor again.

Actor side, :class:`EngineActor` hosts a :class:`~modelsmith.gpu.vllm_engine.VllmEngine` on the
actor's event loop (Ray runs an async actor's methods on one asyncio loop). With
``tensor_parallel_size`` x ``pipeline_parallel_size`` > 1, vLLM runs its own Ray executor from
inside the actor (its workers are placed by Ray across GPUs and nodes).

What crosses the wire: prompts and :class:`~modelsmith.gpu.engine.Sampling` (pickled by Ray),
completions as msgpack, errors as :func:`modelsmith.errors.error_envelope` dicts rebuilt into
their own class here. Adapters travel as paths on shared storage, or packed through the object
store and verified by hash on the actor's node (:mod:`modelsmith.gpu.ray_artifacts`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.abc
import msgspec

from modelsmith.errors import ConflictError, EngineError, ModelsmithError, error_class_for_code
from modelsmith.gpu.engine import (
    Completion,
    Engine,
    EngineInfo,
    EngineLifecycle,
    EngineState,
    PromptInput,
    Sampling,
    TokenCompletion,
)
from modelsmith.gpu.engines import EngineFactory, EngineSpec
from modelsmith.gpu.ray_artifacts import pack
from modelsmith.gpu.ray_backend import (
    Placement,
    RayRequest,
    Unplaceable,
    connect,
    ensure_placeable,
    gib,
)
from modelsmith.gpu.ray_config import RaySection

__all__ = ["RayEngine", "ray_engine_factory"]

T = TypeVar("T")

# How long one watch call waits for a change in the actor before it answers anyway (a heartbeat)
_WATCH_S = 5.0
# A watch that has not answered this long after its own bound means the actor's node is gone.
_WATCH_GRACE_S = 30.0
_STOP_S = 30.0
_MAX_BACKOFF_S = 60.0
_CHUNK_S = 0.02

_Outcome = tuple[dict[str, Any] | None, Any]


def _raise_envelope(envelope: dict[str, Any]) -> None:
    cls = error_class_for_code(int(envelope.get("code", 1000)))
    data = envelope.get("data")
    raise cls(str(envelope.get("message", "engine actor failed")),
              data=data if isinstance(data, dict) else None)


class RayEngine:
    """The daemon-side Engine over one :class:`EngineActor` (see the module docstring)."""

    kind = "vllm-ray"

    def __init__(self, name: str, model_dir: Path, config: RaySection, *,
                 engine_kwargs: dict[str, Any] | None = None,
                 restart_backoff: float | None = None) -> None:
        self.name = name
        self.model_dir = Path(model_dir)
        self._config = config
        self._engine_kwargs = dict(engine_kwargs or {})
        section = config.engine
        parallel = int(self._engine_kwargs.get("tensor_parallel_size", 1)) * section.pipeline_parallel_size
        self.request = RayRequest(
            what=f"engine {name}", num_cpus=section.num_cpus,
            num_gpus=section.num_gpus if parallel == 1 else 0.0,
            memory_bytes=gib(section.memory_gb), resources=section.resources,
            spread_gpus=parallel if parallel > 1 else 0)
        self._restart_backoff = restart_backoff or section.restart_backoff_s
        self._lifecycle = EngineLifecycle(name)
        self._actor: Any = None
        self._remote: dict[str, Any] = {}
        self.placement: Placement | None = None
        self._adapters: dict[str, Path] = {}
        self._restarts = 0
        self._load_seconds: float | None = None
        self._running = False

    # -- status ---------------------------------------------------------------------------
    def info(self) -> EngineInfo:
        """A snapshot; ``node``/``node_gpus`` say where Ray placed the actor (pid: none here,
        the actor's processes are on its node)."""
        placed = self.placement
        return EngineInfo(
            name=self.name, model=str(self.model_dir), kind=self.kind,
            state=self._lifecycle.state, load_seconds=self._load_seconds,
            restarts=self._restarts, adapters=sorted(self._adapters),
            last_error=self._lifecycle.last_error, pid=None,
            node=placed.describe() if placed is not None else None,
            node_gpus=list(placed.gpus) if placed is not None else [])

    async def wait_ready(self, timeout: float) -> None:  # noqa: ASYNC109 (the Engine contract)
        await self._lifecycle.wait_ready(timeout)

    async def health(self) -> bool:
        if self._actor is None or self._lifecycle.state not in (EngineState.WARM,
                                                                EngineState.SLEEPING):
            return False
        with anyio.move_on_after(5):
            try:
                return bool(await self._call(self._actor.health.remote()))
            except EngineError:
                return False
        return False

    # -- calls into the actor -------------------------------------------------------------
    async def _await(self, ref: Any) -> Any:
        """Await one ObjectRef: RayActorError (actor or node gone) is EngineError "dead";
        a cancelled caller cancels the remote call too."""
        from ray.exceptions import RayActorError, RayError

        try:
            return await ref
        except RayActorError as exc:
            self._mark_dead(f"engine actor died: {type(exc).__name__}")
            raise EngineError(f"engine {self.name!r} died (its Ray actor or node is gone); it "
                              "is being restarted", data={"engine": self.name, "reason": "dead"}
                              ) from exc
        except RayError as exc:
            raise EngineError(f"engine {self.name!r} failed in Ray: {type(exc).__name__}",
                              data={"engine": self.name, "reason": "failed"}) from exc
        except BaseException:
            import ray

            with contextlib.suppress(Exception):
                ray.cancel(ref)
            raise

    async def _call(self, ref: Any) -> Any:
        error, value = await self._await(ref)
        if error is not None:
            _raise_envelope(error)
        return value

    def _mark_dead(self, reason: str) -> None:
        if self._lifecycle.state is not EngineState.DEAD:
            self._lifecycle.set(EngineState.DEAD, error=reason)

    def _require_actor(self, wanted: EngineState = EngineState.WARM) -> Any:
        self._lifecycle.require(wanted)
        return self._actor

    # -- generation -----------------------------------------------------------------------
    async def generate(self, prompt: PromptInput, sampling: Sampling, *,
                       adapter: str | None = None) -> Completion:
        actor = self._require_actor()
        raw = await self._call(actor.generate.remote(_plain(prompt), sampling, adapter))
        return msgspec.msgpack.decode(raw, type=Completion)

    async def generate_tokens(self, prompt_text: str, sampling: Sampling, *,
                              adapter: str | None = None) -> TokenCompletion:
        actor = self._require_actor()
        raw = await self._call(actor.generate_tokens.remote(prompt_text, sampling, adapter))
        return msgspec.msgpack.decode(raw, type=TokenCompletion)

    async def generate_many(self, prompts: Sequence[PromptInput], sampling: Sampling, *,
                            adapter: str | None = None) -> AsyncIterator[tuple[int, Completion]]:
        """All prompts in one streaming actor call (vLLM batches them in the actor); results
        in completion order; closing the iterator cancels the call and its requests."""
        actor = self._require_actor()
        if not prompts:
            return
        stream = actor.generate_many.options(num_returns="streaming").remote(
            [_plain(p) for p in prompts], sampling, adapter)
        try:
            async for ref in _dead_as_error(stream, self):
                error, chunk = await self._await(ref)
                if error is not None:
                    _raise_envelope(error)
                for index, raw in chunk:
                    yield index, msgspec.msgpack.decode(raw, type=Completion)
        finally:
            import ray

            with contextlib.suppress(Exception):
                ray.cancel(stream)

    # -- adapters -------------------------------------------------------------------------
    async def load_adapter(self, name: str, path: Path) -> None:
        """Load ``path`` into the actor's engine: by path on shared storage, else packed and
        verified by hash on the actor's node (a ValidationError leaves nothing loaded)."""
        actor = self._require_actor()
        path = await anyio.to_thread.run_sync(Path(path).resolve)
        await self._load_into(actor, name, path)
        self._adapters[name] = path

    async def _load_into(self, actor: Any, name: str, path: Path) -> None:
        if self._config.shared_storage:
            await self._call(actor.load_adapter.remote(name, str(path), None))
            return
        artifact = await anyio.to_thread.run_sync(pack, path)
        await self._call(actor.load_adapter.remote(name, str(path), artifact))

    async def unload_adapter(self, name: str) -> None:
        if name not in self._adapters:
            from modelsmith.errors import NotFound

            raise NotFound(f"adapter {name!r} is not loaded in engine {self.name!r}",
                           data={"engine": self.name, "adapter": name})
        del self._adapters[name]
        if self._actor is not None and self._lifecycle.state in (EngineState.WARM,
                                                                 EngineState.SLEEPING):
            await self._call(self._actor.unload_adapter.remote(name))

    # -- memory ---------------------------------------------------------------------------
    async def sleep(self, level: int = 1) -> None:
        if self._lifecycle.state is EngineState.SLEEPING:
            return
        actor = self._require_actor()
        await self._call(actor.sleep.remote(level))
        self._lifecycle.set(EngineState.SLEEPING)

    async def wake_up(self) -> None:
        if self._lifecycle.state is EngineState.WARM:
            return
        actor = self._require_actor(EngineState.SLEEPING)
        await self._call(actor.wake_up.remote())
        self._lifecycle.set(EngineState.WARM)

    # -- the service ----------------------------------------------------------------------
    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Serve until cancelled: start the actor, follow it, start a new one after a backoff
        when it dies (``[ray.engine] max_restarts``); an unplaceable engine stays dead."""
        if self._running:
            raise ConflictError(f"engine {self.name!r} is running already")
        self._running = True
        self._lifecycle.set(EngineState.LOADING)
        task_status.started()
        backoff = self._restart_backoff
        limit = self._config.engine.max_restarts
        try:
            while True:
                warm_since: float | None = None
                try:
                    await self._start_actor()
                    warm_since = time.monotonic()
                    await self._follow()
                except Unplaceable as exc:
                    self._lifecycle.set(EngineState.DEAD, error=exc.message)
                    await anyio.sleep_forever()  # the cluster cannot hold it: waiting cannot help
                except EngineError as exc:
                    self._mark_dead(exc.message)
                await self._stop_actor()
                if limit >= 0 and self._restarts >= limit:
                    self._lifecycle.set(EngineState.DEAD, error=(self._lifecycle.last_error or "")
                                        + f" (not restarted: max_restarts = {limit})")
                    await anyio.sleep_forever()
                if warm_since is not None and time.monotonic() - warm_since > 60:
                    backoff = self._restart_backoff
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
                self._restarts += 1
                self._lifecycle.set(EngineState.LOADING)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(_STOP_S + 5):
                await self._stop_actor()
            self._lifecycle.set(EngineState.COLD)
            self._running = False

    async def _start_actor(self) -> None:
        started = time.monotonic()
        await connect(self._config)  # first: it sets the environment Ray reads on import
        import ray

        await ensure_placeable(self.request)
        actor_class = ray.remote(EngineActor)
        self._actor = actor_class.options(**self.request.options(), max_restarts=0,
                                          max_concurrency=1000).remote(
            self.name, str(self.model_dir), self._engine_kwargs,
            self._config.engine.pipeline_parallel_size)
        # Waits while Ray places the actor (the cluster has the resources, maybe busy now).
        placement = await self._call(self._actor.start.remote())
        self.placement = Placement(**placement)
        ready = await self._await(self._actor.wait_ready.remote(3600.0))
        if ready[0] is not None:
            _raise_envelope(ready[0])
        for name, path in list(self._adapters.items()):
            try:
                await self._load_into(self._actor, name, path)
            except (EngineError, ModelsmithError) as exc:
                del self._adapters[name]  # gone meanwhile: forget it, as VllmEngine does
                self._lifecycle.last_error = exc.message
        self._load_seconds = time.monotonic() - started
        self._lifecycle.set(EngineState.WARM)

    async def _follow(self) -> None:
        """Mirror the actor's engine state until the actor dies (EngineError "dead")."""
        known = EngineState.WARM.value
        while True:
            with anyio.move_on_after(_WATCH_S + _WATCH_GRACE_S) as scope:
                raw = await self._call(self._actor.watch.remote(known, _WATCH_S))
            if scope.cancelled_caught:
                self._mark_dead("engine actor stopped answering (its node is unreachable)")
                raise EngineError(f"engine {self.name!r}: its Ray actor stopped answering",
                                  data={"engine": self.name, "reason": "dead"})
            inner = msgspec.msgpack.decode(raw, type=EngineInfo)
            known = inner.state.value
            if inner.state is not self._lifecycle.state:
                self._lifecycle.set(inner.state, error=inner.last_error)

    async def _stop_actor(self) -> None:
        actor, self._actor = self._actor, None
        if actor is None:
            return
        import ray

        with anyio.move_on_after(_STOP_S), contextlib.suppress(Exception):
            await actor.stop.remote()
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)


async def _dead_as_error(stream: Any, engine: RayEngine) -> AsyncIterator[Any]:
    """The refs of a streaming call; the actor's death while streaming is EngineError "dead"
    (as :meth:`RayEngine._await` makes it for one ref)."""
    from ray.exceptions import RayActorError

    try:
        async for ref in stream:
            yield ref
    except RayActorError as exc:
        engine._mark_dead(f"engine actor died: {type(exc).__name__}")
        raise EngineError(f"engine {engine.name!r} died (its Ray actor or node is gone); it is "
                          "being restarted", data={"engine": engine.name, "reason": "dead"}
                          ) from exc


def _plain(prompt: PromptInput) -> str | list[dict[str, str]]:
    return prompt if isinstance(prompt, str) else [dict(m) for m in prompt]


async def _outcome(work: Awaitable[T]) -> _Outcome:
    from modelsmith.errors import error_envelope

    try:
        return None, await work
    except ModelsmithError as exc:
        return error_envelope(exc), None


class EngineActor:
    """Actor side: one VllmEngine served on the actor's event loop (see the module docstring).

    Every method returns ``(error_envelope | None, value)``: typed errors cross as data."""

    def __init__(self, name: str, model_dir: str, engine_kwargs: dict[str, Any],
                 pipeline_parallel_size: int = 1) -> None:
        import os

        from modelsmith.gpu.vllm_engine import VllmEngine, cpu_engine_env

        for key, value in cpu_engine_env().items():
            os.environ.setdefault(key, value)
        kwargs = dict(engine_kwargs)
        parallel = int(kwargs.get("tensor_parallel_size", 1)) * pipeline_parallel_size
        extra: dict[str, Any] = {}
        if parallel > 1:
            # vLLM's own Ray executor places its workers (one GPU each) across the cluster.
            extra = {"distributed_executor_backend": "ray",
                     "pipeline_parallel_size": pipeline_parallel_size}
        self._engine = VllmEngine(name, Path(model_dir), extra_engine_args=extra, **kwargs)
        self._stop: anyio.Event | None = None
        self._host: Any = None
        self._cache = Path(os.environ.get("TMPDIR", "/tmp")) / "modelsmith-ray-adapters"

    async def start(self) -> _Outcome:
        import asyncio

        from modelsmith.gpu.ray_backend import current_placement

        if self._host is None:
            self._stop = anyio.Event()
            stop = self._stop

            async def host() -> None:
                async with anyio.create_task_group() as tg:
                    await tg.start(self._engine.run)
                    await stop.wait()
                    tg.cancel_scope.cancel()

            self._host = asyncio.get_running_loop().create_task(host())
        placed = current_placement()
        return None, {"node_id": placed.node_id, "node_ip": placed.node_ip, "gpus": placed.gpus}

    async def wait_ready(self, timeout: float) -> _Outcome:  # noqa: ASYNC109
        return await _outcome(self._engine.wait_ready(timeout))

    async def watch(self, known: str, timeout: float) -> _Outcome:  # noqa: ASYNC109
        """The engine's info once its state is no longer ``known`` (or after ``timeout``)."""
        with anyio.move_on_after(timeout):
            while self._engine.info().state.value == known:  # noqa: ASYNC110 (its own state)
                await anyio.sleep(0.1)
        return None, msgspec.msgpack.encode(self._engine.info())

    async def health(self) -> _Outcome:
        return None, await self._engine.health()

    async def generate(self, prompt: PromptInput, sampling: Sampling,
                       adapter: str | None) -> _Outcome:
        error, value = await _outcome(self._engine.generate(prompt, sampling, adapter=adapter))
        return error, None if value is None else msgspec.msgpack.encode(value)

    async def generate_tokens(self, prompt_text: str, sampling: Sampling,
                              adapter: str | None) -> _Outcome:
        error, value = await _outcome(
            self._engine.generate_tokens(prompt_text, sampling, adapter=adapter))
        return error, None if value is None else msgspec.msgpack.encode(value)

    async def generate_many(self, prompts: list[PromptInput], sampling: Sampling,
                            adapter: str | None) -> AsyncIterator[_Outcome]:
        """Streams ``(None, [(index, msgpack completion), ...])``: every completion that
        finished since the last item, so requests that end in the same engine step cross
        as one object; a failure is the last item, ``(envelope, None)``."""
        from modelsmith.errors import error_envelope

        send, receive = anyio.create_memory_object_stream[tuple[int, bytes] | ModelsmithError](
            max_buffer_size=len(prompts) + 1)

        async def produce() -> None:
            async with send:
                results = self._engine.generate_many(prompts, sampling, adapter=adapter)
                try:
                    async with contextlib.aclosing(results):  # type: ignore[type-var]
                        async for index, completion in results:
                            send.send_nowait((index, msgspec.msgpack.encode(completion)))
                except ModelsmithError as exc:
                    send.send_nowait(exc)

        async with anyio.create_task_group() as tg, receive:
            tg.start_soon(produce)
            async for first in receive:
                chunk = [first]
                # Gather what finishes within _CHUNK_S of the first: one object per batch
                # rather than per answer (each streamed object costs about a millisecond).
                with anyio.move_on_after(_CHUNK_S), \
                        contextlib.suppress(anyio.EndOfStream):
                    while not isinstance(chunk[-1], ModelsmithError):
                        chunk.append(await receive.receive())
                done = [item for item in chunk if not isinstance(item, ModelsmithError)]
                if done:
                    yield None, done
                failures = [item for item in chunk if isinstance(item, ModelsmithError)]
                if failures:
                    tg.cancel_scope.cancel()
                    yield error_envelope(failures[0]), None
                    return

    async def load_adapter(self, name: str, path: str, artifact: Any) -> _Outcome:
        async def load() -> None:
            target = Path(path)
            if artifact is not None:
                from modelsmith.gpu.ray_artifacts import unpack

                target = self._cache / self._engine.name / artifact.digest[:32]
                if not target.is_dir():
                    await anyio.to_thread.run_sync(unpack, artifact, target)
            await self._engine.load_adapter(name, target)

        return await _outcome(load())

    async def unload_adapter(self, name: str) -> _Outcome:
        return await _outcome(self._engine.unload_adapter(name))

    async def sleep(self, level: int) -> _Outcome:
        return await _outcome(self._engine.sleep(level))

    async def wake_up(self) -> _Outcome:
        return await _outcome(self._engine.wake_up())

    async def stop(self) -> None:
        """Shut the engine down (its engine core process with it) before the actor goes."""
        if self._stop is not None and self._host is not None:
            self._stop.set()
            with anyio.move_on_after(_STOP_S), contextlib.suppress(BaseException):
                await self._host


def ray_engine_factory(config: RaySection, fallback: EngineFactory) -> EngineFactory:
    """An :data:`~modelsmith.gpu.engines.EngineFactory`: vLLM engines as Ray actors, the
    OpenAI-compatible ones (which live elsewhere already) through ``fallback``."""
    def factory(name: str, spec: EngineSpec) -> Engine:
        if spec.kind != "vllm":
            return fallback(name, spec)
        return RayEngine(name, spec.model, config, engine_kwargs={
            "max_model_len": spec.max_model_len, "max_lora_rank": spec.max_lora_rank,
            "max_loras": spec.max_loras, "gpu_memory_utilization": spec.gpu_memory_utilization,
            "tensor_parallel_size": spec.tensor_parallel_size, "dtype": spec.dtype})

    return factory
