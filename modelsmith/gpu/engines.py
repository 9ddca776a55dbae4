"""The engine pool: one warm engine per distinct base model, shared by the clusters that use it.

The pool is a service (``await tg.start(pool.run)``): it starts every engine in its own task
group and returns at once; engines load in the background (state ``loading``) and are restarted
by their own ``run`` when they die. Clusters look their engine up by name.

The pool knows nothing of cluster configs: the daemon describes each cluster's engine with an
:class:`EngineSpec` (``modelsmith.daemon.app.engine_spec_for``), so gpu/ never imports loop/.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anyio
import anyio.abc

from modelsmith.errors import EngineError
from modelsmith.gpu.engine import Engine
from modelsmith.rpc.schema.daemon import EngineStatus

__all__ = ["EngineFactory", "EnginePool", "EngineSpec", "default_engine_factory"]


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


class EnginePool:
    def __init__(self, factory: EngineFactory = default_engine_factory) -> None:
        self._factory = factory
        self._engines: dict[str, Engine] = {}
        self._by_cluster: dict[str, str] = {}
        self._loaded_adapters: dict[str, dict[str, Path]] = {}

    def add_cluster(self, cluster: str, spec: EngineSpec) -> None:
        """Give cluster ``cluster`` the engine for ``spec``, building it unless one is shared."""
        if spec.kind == "openai" and not spec.url:
            raise EngineError(f"cluster {cluster}: engine.url is required for kind 'openai'",
                              data={"cluster": cluster})
        key = spec.key
        if key not in self._engines:
            name = f"{spec.model.name}-{len(self._engines)}"
            self._engines[key] = self._factory(name, spec)
            self._loaded_adapters[key] = {}
        self._by_cluster[cluster] = key

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

    async def ensure_adapter(self, cluster: str, name: str, path: Path) -> str:
        """Load ``path`` into the cluster's engine as ``cluster:name`` unless it is there already."""
        key = self._by_cluster[cluster]
        adapter = f"{cluster}:{name}"
        loaded = self._loaded_adapters[key]
        if loaded.get(adapter) != path:
            await self._engines[key].load_adapter(adapter, path)
            loaded[adapter] = path
        return adapter

    def statuses(self) -> list[EngineStatus]:
        out: list[EngineStatus] = []
        for engine in self._engines.values():
            info = engine.info()
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
                )
            )
        return out
