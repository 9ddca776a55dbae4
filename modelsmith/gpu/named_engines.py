"""Named engines: the ``[engines.NAME]`` sections of ``<home>/modelsmith.toml`` as Engines.

Besides each cluster's own engine, the daemon's config names engines to compare against, judge
with and teach from (docs/engines.md): ``kind = "openai"`` (an OpenAI-compatible server or a
hosted API, by model name) or ``kind = "vllm"`` (a local model directory). :class:`NamedEngines`
is the registry: it knows every name, its prices and its concurrency, and builds an engine the
first time :meth:`NamedEngines.get` asks for it.

Resources and their handling: the registry is a service (``await tg.start(named.run)``). It runs
the engines it builds itself in its own task group, those built before ``run`` as soon as it
starts and later ones as they are built, and cancels them (each closes its client, shielded and
bounded) when it is cancelled.

vLLM named engines and the pool. A ``kind = "vllm"`` engine is described by an
:class:`~modelsmith.gpu.engines.EngineSpec` (:meth:`NamedEngines.vllm_specs`), keyed like a
cluster's (``vllm:<model dir>``), so the pool can give it the warm engine of any cluster on the
same base model instead of loading the model twice. The daemon passes a ``vllm_provider``: a
callable ``(name, spec) -> Engine`` that registers the spec with the pool (a cluster's spec
first, so its LoRA limits build the engine) and returns the pool's engine for that key; the pool
then runs it, shares its device with trainers through its ``EngineGate``, and users go through
the pool's ``serving`` for it as for a cluster's engine. Without a provider (tests, benches, a
box without a pool) the registry builds the vLLM engine itself and runs it like the others.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anyio
import anyio.abc

from modelsmith.daemon.config import (
    DaemonConfig,
    NamedEngineConfig,
    OpenAINamedEngine,
    VllmNamedEngine,
)
from modelsmith.errors import NotFound
from modelsmith.gpu.engine import Engine
from modelsmith.gpu.engines import EngineSpec, default_engine_factory
from modelsmith.gpu.openai_engine import OpenAIEngine

__all__ = [
    "NAMED_MAX_LORAS",
    "NAMED_MAX_LORA_RANK",
    "EnginePrices",
    "NamedEngines",
    "UnknownEngine",
    "VllmProvider",
    "openai_engine_for",
    "vllm_spec_for",
]

# A named engine serves no adapters of its own; these are a cluster's defaults
# ([engine] max_lora_rank, max_loras), so that an engine the pool builds from a named engine's
# spec also serves the adapters of a cluster with default settings on the same base.
NAMED_MAX_LORA_RANK = 16
NAMED_MAX_LORAS = 4

VllmProvider = Callable[[str, EngineSpec], Engine]
"""Gives the engine for a vLLM named engine's spec and runs it (the daemon: the engine pool)."""


class UnknownEngine(NotFound):
    """No engine of that name in the daemon's config; ``data["known"]`` lists those there are."""


@dataclass(frozen=True, slots=True)
class EnginePrices:
    """What an engine's tokens cost, in USD per million; None where the config gives none."""

    usd_per_mtok_in: float | None = None
    usd_per_mtok_out: float | None = None

    @property
    def known(self) -> bool:
        """True when both prices are set (a cost can be computed)."""
        return self.usd_per_mtok_in is not None and self.usd_per_mtok_out is not None

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        """The cost of that many tokens, or None unless both prices are known."""
        if self.usd_per_mtok_in is None or self.usd_per_mtok_out is None:
            return None
        return (prompt_tokens * self.usd_per_mtok_in
                + completion_tokens * self.usd_per_mtok_out) / 1_000_000


def vllm_spec_for(config: VllmNamedEngine, home: Path) -> EngineSpec:
    """The pool's description of a vLLM named engine (a relative model path is under home)."""
    model = Path(config.model).expanduser()
    if not model.is_absolute():
        model = home / model
    return EngineSpec(
        model=model.resolve(),
        kind="vllm",
        dtype=config.dtype,
        max_model_len=config.max_model_len,
        url=None,
        api_key_env=None,
        gpu_memory_utilization=config.gpu_memory_utilization,
        tensor_parallel_size=config.tensor_parallel_size,
        max_lora_rank=NAMED_MAX_LORA_RANK,
        max_loras=NAMED_MAX_LORAS,
    )


def openai_engine_for(name: str, config: OpenAINamedEngine) -> OpenAIEngine:
    """The HTTP engine for an OpenAI-compatible named engine (not started)."""
    return OpenAIEngine(
        name,
        config.url,
        config.model,
        api_key_env=config.api_key_env,
        concurrency=config.max_concurrency,
        request_timeout=config.timeout_s,
        max_retries=config.max_retries,
        retry_max_delay=config.retry_max_delay_s,
    )


class NamedEngines:
    """The named engines of one daemon config, built on first use.

    Lives on the event loop thread (``get`` may start an engine in the registry's task group).
    """

    def __init__(
        self,
        engines: Mapping[str, NamedEngineConfig],
        *,
        home: Path,
        vllm_provider: VllmProvider | None = None,
    ) -> None:
        self._configs = dict(engines)
        self._home = home
        self._vllm_provider = vllm_provider
        self._built: dict[str, Engine] = {}
        self._owned: dict[str, Engine] = {}  # built here, so run() runs them
        self._task_group: anyio.abc.TaskGroup | None = None

    @classmethod
    def from_config(
        cls, config: DaemonConfig, *, home: Path, vllm_provider: VllmProvider | None = None
    ) -> NamedEngines:
        """The registry of ``config.engines``."""
        return cls(config.engines, home=home, vllm_provider=vllm_provider)

    # -- what the config says ---------------------------------------------------------------
    def names(self) -> list[str]:
        """Every named engine, sorted."""
        return sorted(self._configs)

    def config(self, name: str) -> NamedEngineConfig:
        """The ``[engines.NAME]`` section; UnknownEngine if there is none."""
        config = self._configs.get(name)
        if config is None:
            known = self.names()
            raise UnknownEngine(
                f"no engine named {name!r} in modelsmith.toml; known engines: "
                + (", ".join(known) if known else "none"),
                data={"engine": name, "known": known},
            )
        return config

    def model(self, name: str) -> str:
        """What the engine serves: an OpenAI model id (or served name), a vLLM model dir."""
        return self.config(name).model

    def kind(self, name: str) -> Literal["vllm", "openai"]:
        return self.config(name).kind

    def prices(self, name: str) -> EnginePrices:
        """The engine's token prices (each None where unset)."""
        config = self.config(name)
        return EnginePrices(config.usd_per_mtok_in, config.usd_per_mtok_out)

    def max_concurrency(self, name: str) -> int | None:
        """Requests the engine takes at once; None for in-process vLLM (send them all)."""
        config = self.config(name)
        return config.max_concurrency if isinstance(config, OpenAINamedEngine) else None

    def request_timeout(self, name: str) -> float | None:
        """The bound on one request (``timeout_s``); None for in-process vLLM."""
        config = self.config(name)
        return config.timeout_s if isinstance(config, OpenAINamedEngine) else None

    def vllm_specs(self) -> dict[str, EngineSpec]:
        """The pool's spec of every vLLM named engine, by name."""
        return {name: vllm_spec_for(config, self._home)
                for name, config in sorted(self._configs.items())
                if isinstance(config, VllmNamedEngine)}

    # -- engines ----------------------------------------------------------------------------
    def get(self, name: str) -> Engine:
        """The engine named ``name``, built the first time (UnknownEngine if none is).

        An engine the registry builds runs in its task group (once :meth:`run` has started):
        wait for it with ``wait_ready``. A vLLM one given by the ``vllm_provider`` is run by it.
        """
        engine = self._built.get(name)
        if engine is not None:
            return engine
        config = self.config(name)
        if isinstance(config, OpenAINamedEngine):
            engine = openai_engine_for(name, config)
        elif self._vllm_provider is not None:
            engine = self._vllm_provider(name, vllm_spec_for(config, self._home))
        else:
            engine = default_engine_factory(name, vllm_spec_for(config, self._home))
        self._built[name] = engine
        if isinstance(config, OpenAINamedEngine) or self._vllm_provider is None:
            self._owned[name] = engine
            if self._task_group is not None:
                self._task_group.start_soon(engine.run, name=f"engine {name}")
        return engine

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the engines built here until cancelled (started: at once, as engines load in
        the background); cancelling stops them all."""
        async with anyio.create_task_group() as tg:
            for engine in self._owned.values():
                await tg.start(engine.run)
            self._task_group = tg
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                self._task_group = None
