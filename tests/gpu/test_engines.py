"""The engine pool: engines shared by base model, adapters loaded once, specs built by the daemon.

The engines here stand in at the hardware boundary and implement the same ``Engine`` Protocol;
the real vLLM engine under the pool is exercised by the daemon tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import anyio
import anyio.abc
import pytest

from modelsmith.daemon.app import engine_spec_for
from modelsmith.errors import EngineError
from modelsmith.gpu.engine import (
    Completion,
    Engine,
    EngineInfo,
    EngineLifecycle,
    EngineState,
    PromptInput,
    Sampling,
)
from modelsmith.gpu.engines import EnginePool, EngineSpec
from modelsmith.loop.cluster.config import load_cluster


class EchoEngine:
    """Answers every prompt with its own text; records the adapters it was told to load."""

    def __init__(self, name: str, spec: EngineSpec) -> None:
        self.spec = spec
        self.loads: list[tuple[str, Path]] = []
        self._lifecycle = EngineLifecycle(name)

    def info(self) -> EngineInfo:
        return EngineInfo(name=self._lifecycle.name, model=str(self.spec.model), kind="echo",
                          state=self._lifecycle.state, adapters=[name for name, _ in self.loads])

    async def wait_ready(self, timeout: float) -> None:  # noqa: ASYNC109 (the contract names it)
        await self._lifecycle.wait_ready(timeout)

    async def generate(
        self, prompt: PromptInput, sampling: Sampling, *, adapter: str | None = None
    ) -> Completion:
        self._lifecycle.require()
        return Completion(text=str(prompt), token_count=1, finish_reason="stop")

    async def generate_many(
        self, prompts: Sequence[PromptInput], sampling: Sampling, *, adapter: str | None = None
    ) -> AsyncIterator[tuple[int, Completion]]:
        for index, prompt in enumerate(prompts):
            yield index, await self.generate(prompt, sampling, adapter=adapter)

    async def load_adapter(self, name: str, path: Path) -> None:
        self.loads.append((name, path))

    async def unload_adapter(self, name: str) -> None:
        self.loads = [(n, p) for n, p in self.loads if n != name]

    async def sleep(self, level: int = 1) -> None:
        self._lifecycle.set(EngineState.SLEEPING)

    async def wake_up(self) -> None:
        self._lifecycle.set(EngineState.WARM)

    async def health(self) -> bool:
        return self._lifecycle.state in (EngineState.WARM, EngineState.SLEEPING)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        self._lifecycle.set(EngineState.LOADING)
        task_status.started()
        self._lifecycle.set(EngineState.WARM)
        try:
            await anyio.sleep_forever()
        finally:
            self._lifecycle.set(EngineState.COLD)


def spec(model: str = "/models/tiny", **changes: object) -> EngineSpec:
    base = EngineSpec(model=Path(model), kind="vllm", dtype="auto", max_model_len=1024, url=None,
                      api_key_env=None, gpu_memory_utilization=0.85, tensor_parallel_size=1,
                      max_lora_rank=16, max_loras=4)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


class Built:
    """The factory the pool is given: builds echo engines and remembers them."""

    def __init__(self) -> None:
        self.engines: list[EchoEngine] = []

    def __call__(self, name: str, engine_spec: EngineSpec) -> Engine:
        engine = EchoEngine(name, engine_spec)
        self.engines.append(engine)
        return engine


def test_the_echo_engine_implements_the_engine_protocol() -> None:
    assert isinstance(EchoEngine("e", spec()), Engine)


def test_clusters_on_the_same_base_model_share_one_engine_and_others_get_their_own() -> None:
    built = Built()
    pool = EnginePool(factory=built)
    pool.add_cluster("a", spec("/models/tiny"))
    pool.add_cluster("b", spec("/models/tiny", max_model_len=2048))
    pool.add_cluster("c", spec("/models/other"))
    assert len(built.engines) == 2
    assert pool.engine_for("a") is pool.engine_for("b") is built.engines[0]
    assert pool.engine_for("c") is built.engines[1]
    # The first spec of a shared engine builds it; names are unique within the pool.
    assert built.engines[0].spec.max_model_len == 1024
    assert [s.name for s in pool.statuses()] == ["tiny-0", "other-1"]


def test_openai_engines_are_shared_only_for_the_same_server_and_model() -> None:
    built = Built()
    pool = EnginePool(factory=built)
    pool.add_cluster("a", spec("gpt", kind="openai", url="http://one"))
    pool.add_cluster("b", spec("gpt", kind="openai", url="http://one"))
    pool.add_cluster("c", spec("gpt", kind="openai", url="http://two"))
    pool.add_cluster("d", spec("gpt"))
    assert len(built.engines) == 3
    assert pool.engine_for("a") is pool.engine_for("b")


def test_an_openai_spec_without_a_url_is_refused_naming_the_cluster() -> None:
    pool = EnginePool(factory=Built())
    with pytest.raises(EngineError) as info:
        pool.add_cluster("pricing", spec(kind="openai"))
    assert info.value.data["cluster"] == "pricing"


def test_a_cluster_without_an_engine_gets_engine_error() -> None:
    pool = EnginePool(factory=Built())
    with pytest.raises(EngineError) as info:
        pool.engine_for("pricing")
    assert info.value.data["cluster"] == "pricing"


async def test_an_adapter_is_loaded_once_per_path_under_the_clusters_name(tmp_path: Path) -> None:
    built = Built()
    pool = EnginePool(factory=built)
    pool.add_cluster("a", spec())
    pool.add_cluster("b", spec())
    first, second = tmp_path / "v1", tmp_path / "v2"
    # Adapters go through the engine's gate, which lets users in once the engine is warm.
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(pool.run)
            assert await pool.ensure_adapter("a", "cand", first) == "a:cand"
            assert await pool.ensure_adapter("a", "cand", first) == "a:cand"
            assert await pool.ensure_adapter("b", "cand", first) == "b:cand"
            assert await pool.ensure_adapter("a", "cand", second) == "a:cand"
            tg.cancel_scope.cancel()
    assert built.engines[0].loads == [("a:cand", first), ("b:cand", first), ("a:cand", second)]


async def test_run_starts_every_engine_and_statuses_report_them_warm() -> None:
    pool = EnginePool(factory=Built())
    pool.add_cluster("a", spec("/models/tiny"))
    pool.add_cluster("c", spec("/models/other"))
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(pool.run)
            for cluster in ("a", "c"):
                await pool.engine_for(cluster).wait_ready(5)
            assert {s.state for s in pool.statuses()} == {"warm"}
            tg.cancel_scope.cancel()
    assert {s.state for s in pool.statuses()} == {"cold"}


def test_the_daemon_builds_a_spec_from_every_engine_field_of_cluster_toml(tmp_path: Path) -> None:
    root = tmp_path / "pricing"
    root.mkdir()
    (root / "cluster.toml").write_text(
        '[model]\nbase = "models/tiny"\nmax_model_len = 512\ndtype = "float32"\n\n'
        '[engine]\nkind = "openai"\nurl = "http://localhost:9"\napi_key_env = "KEY"\n'
        "gpu_memory_utilization = 0.5\ntensor_parallel_size = 2\nmax_lora_rank = 8\n"
        "max_loras = 2\nmodel = \"tiny-served\"\n"
    )
    assert engine_spec_for(load_cluster(root)) == EngineSpec(
        model=(root / "models" / "tiny").resolve(), kind="openai", dtype="float32",
        max_model_len=512, url="http://localhost:9", api_key_env="KEY",
        gpu_memory_utilization=0.5, tensor_parallel_size=2, max_lora_rank=8, max_loras=2,
        served_model="tiny-served",
    )


def test_an_openai_engine_asks_for_the_served_name_or_else_the_base_path() -> None:
    named = spec("/models/tiny", kind="openai", url="http://one", served_model="tiny")
    unnamed = spec("/models/tiny", kind="openai", url="http://one")
    assert (named.openai_model, unnamed.openai_model) == ("tiny", "/models/tiny")
    # Two names on one server are two engines; the same name is one.
    built = Built()
    pool = EnginePool(factory=built)
    pool.add_cluster("a", named)
    pool.add_cluster("b", unnamed)
    pool.add_cluster("c", dataclasses.replace(named))
    assert len(built.engines) == 2
    assert pool.engine_for("a") is pool.engine_for("c") is not pool.engine_for("b")


def test_the_default_factory_sends_the_served_name_as_the_model() -> None:
    from modelsmith.gpu.engines import default_engine_factory

    engine = default_engine_factory("remote", spec(kind="openai", url="http://one", served_model="tiny"))
    assert engine.info().model == "tiny"
