"""The engine pool: one warm engine per distinct base model, shared by the clusters that use it.

The pool is a service (``await tg.start(pool.run)``): it starts every engine in its own task
group and returns at once; engines load in the background (state ``loading``) and are restarted
by their own ``run`` when they die. Clusters look their engine up by name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from modelsmith.errors import EngineError
from modelsmith.loop.cluster.config import Cluster
from modelsmith.rpc.schema.daemon import EngineStatus

EngineFactory = Callable[[str, Cluster], Any]


def default_engine_factory(name: str, cluster: Cluster) -> Any:
    """Build the engine a cluster's config asks for (vLLM in-process, or OpenAI-compatible HTTP)."""
    cfg = cluster.config
    if cfg.engine.kind == "openai":
        from modelsmith.gpu.openai_engine import OpenAIEngine

        if not cfg.engine.url:
            raise EngineError(f"cluster {cluster.name}: engine.url is required for kind 'openai'")
        return OpenAIEngine(name, cfg.engine.url, str(cluster.base_model), api_key_env=cfg.engine.api_key_env)
    from modelsmith.gpu.vllm_engine import VllmEngine

    return VllmEngine(
        name,
        cluster.base_model,
        max_model_len=cfg.model.max_model_len,
        max_lora_rank=cfg.engine.max_lora_rank,
        max_loras=cfg.engine.max_loras,
        gpu_memory_utilization=cfg.engine.gpu_memory_utilization,
        tensor_parallel_size=cfg.engine.tensor_parallel_size,
        dtype=cfg.model.dtype,
    )


def engine_key(cluster: Cluster) -> str:
    cfg = cluster.config
    if cfg.engine.kind == "openai":
        return f"openai:{cfg.engine.url}:{cfg.model.base}"
    return f"vllm:{cluster.base_model}"


class EnginePool:
    def __init__(self, factory: EngineFactory = default_engine_factory) -> None:
        self._factory = factory
        self._engines: dict[str, Any] = {}
        self._by_cluster: dict[str, str] = {}
        self._loaded_adapters: dict[str, dict[str, Path]] = {}

    def add_cluster(self, cluster: Cluster) -> None:
        key = engine_key(cluster)
        if key not in self._engines:
            name = f"{cluster.base_model.name}-{len(self._engines)}"
            self._engines[key] = self._factory(name, cluster)
            self._loaded_adapters[key] = {}
        self._by_cluster[cluster.name] = key

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            for engine in self._engines.values():
                await tg.start(engine.run)
            task_status.started()

    def engine_for(self, cluster: str) -> Any:
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
                    model=str(info.model),
                    state=str(getattr(info.state, "value", info.state)),
                    load_seconds=info.load_seconds,
                    restarts=info.restarts,
                    adapters=list(info.adapters),
                    last_error=info.last_error,
                    pid=info.pid,
                )
            )
        return out
