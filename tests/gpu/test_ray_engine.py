"""Engines in Ray actors on a two-node Ray cluster on the CPU (ray.cluster_utils.Cluster).

One cluster and one engine actor (real vLLM CPU build, tiny model) per module: the head node is
"the daemon's box", the second node carries the custom resource ``engine_node`` that the engine
asks for, so the actor must land there.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest

pytest.importorskip("ray")

import ray
from ray.cluster_utils import Cluster

from modelsmith.errors import EngineError, NotFound, ValidationError
from modelsmith.gpu.engine import Engine, EngineState, ReplaysTokens, Sampling
from modelsmith.gpu.engines import EnginePool, EngineSpec, default_engine_factory
from modelsmith.gpu.ray_backend import RayRequest, Unplaceable, check_placeable, cluster_nodes
from modelsmith.gpu.ray_config import RaySection
from modelsmith.gpu.ray_engine import RayEngine, ray_engine_factory

from .conftest import ENGINE_LOAD_TIMEOUT, wait_until

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.asyncio(loop_scope="session")]

GREEDY = Sampling(temperature=0.0, max_tokens=8)
PROMPTS = ["What is the click-through rate?", "Explain budget pacing.", "Bid floor?"]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Cluster]:
    """Two Ray nodes on this machine, one logical CPU each; torn down with the module."""
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"daemon_box": 1}, "include_dashboard": False})
    cluster.add_node(num_cpus=1, resources={"engine_node": 1})
    ray.init(address=cluster.address, namespace="modelsmith-test", log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def ray_config(cluster: Cluster, **engine: Any) -> RaySection:
    return RaySection.model_validate({
        "address": cluster.address, "namespace": "modelsmith-test",
        "engine": {"num_cpus": 1, "num_gpus": 0, "resources": {"engine_node": 1},
                   "restart_backoff_s": 0.2, **engine}})


def engine_kwargs() -> dict[str, Any]:
    return {"max_model_len": 512, "max_lora_rank": 8, "max_loras": 2, "restart_backoff": 0.1}


@pytest.fixture(scope="module")
async def ray_engine(ray_cluster: Cluster, tiny_model_dir: Path) -> AsyncIterator[RayEngine]:
    engine = RayEngine("tiny-ray", tiny_model_dir, ray_config(ray_cluster),
                       engine_kwargs=engine_kwargs())
    stop = anyio.Event()

    async def host() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            await stop.wait()
            tg.cancel_scope.cancel()

    # The module's task group lives in a host task of its own (see tests/gpu/conftest.py).
    task = asyncio.get_running_loop().create_task(host())
    try:
        await engine.wait_ready(timeout=ENGINE_LOAD_TIMEOUT)
        yield engine
    finally:
        stop.set()
        with anyio.fail_after(120):
            await task


async def collect(engine: Engine, prompts: list[str]) -> dict[int, str]:
    return {index: c.text async for index, c in engine.generate_many(prompts, GREEDY)}


async def test_an_eval_runs_on_the_engine_actor_on_the_node_with_its_resource(
    ray_engine: RayEngine, ray_cluster: Cluster,
) -> None:
    assert isinstance(ray_engine, Engine) and isinstance(ray_engine, ReplaysTokens)
    info = ray_engine.info()
    assert info.state is EngineState.WARM and info.kind == "vllm-ray"
    # Ray placed it on the second node, the only one with `engine_node`.
    engine_node = next(n for n in cluster_nodes() if "engine_node" in n["resources"])
    assert ray_engine.placement is not None
    assert ray_engine.placement.node_id == engine_node["node_id"]
    assert info.node is not None and engine_node["node_id"][:12] in info.node
    assert await ray_engine.health()

    answers = await collect(ray_engine, PROMPTS)
    assert sorted(answers) == [0, 1, 2] and all(answers.values())
    single = await ray_engine.generate(PROMPTS[0], GREEDY)
    assert single.text == answers[0] and single.token_count >= 1  # greedy: the same answer
    chat = await ray_engine.generate([{"role": "user", "content": "Bid floor?"}], GREEDY)
    assert chat.text == answers[2]
    tokens = await ray_engine.generate_tokens("Budget pacing", GREEDY)
    assert len(tokens.token_ids) == len(tokens.token_logprobs) >= 1


async def test_the_same_answers_as_the_in_process_engine(
    ray_engine: RayEngine, vllm_engine: Engine,
) -> None:
    assert await collect(ray_engine, PROMPTS) == await collect(vllm_engine, PROMPTS)


async def test_typed_errors_cross_the_actor_boundary(ray_engine: RayEngine, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        await ray_engine.generate(PROMPTS[0], GREEDY, adapter="nope")
    with pytest.raises(NotFound):
        await ray_engine.unload_adapter("nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFound):  # the actor's engine: no adapter_config.json there
        await ray_engine.load_adapter("empty", tmp_path / "empty")


async def test_an_adapter_travels_by_object_store_verified_and_changes_answers(
    ray_engine: RayEngine, perturbed_adapter_dir: Path, tmp_path: Path,
) -> None:
    base = await collect(ray_engine, PROMPTS)
    await ray_engine.load_adapter("c:iter-1", perturbed_adapter_dir)
    assert ray_engine.info().adapters == ["c:iter-1"]
    tuned = {i: c.text async for i, c in ray_engine.generate_many(PROMPTS, GREEDY,
                                                                   adapter="c:iter-1")}
    assert tuned != base
    await ray_engine.unload_adapter("c:iter-1")
    assert ray_engine.info().adapters == []
    # A symlink in an adapter directory is refused before anything travels.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").symlink_to(perturbed_adapter_dir / "adapter_config.json")
    with pytest.raises(ValidationError):
        await ray_engine.load_adapter("bad", bad)


async def test_sleep_refuses_generation_until_woken(ray_engine: RayEngine) -> None:
    await ray_engine.sleep()
    assert ray_engine.info().state is EngineState.SLEEPING
    with pytest.raises(EngineError):
        await ray_engine.generate(PROMPTS[0], GREEDY)
    await ray_engine.wake_up()
    assert (await ray_engine.generate(PROMPTS[0], GREEDY)).text


async def test_an_engine_asking_for_a_resource_the_cluster_lacks_is_refused(
    ray_cluster: Cluster, tiny_model_dir: Path,
) -> None:
    # 4 GPUs on one node of a CPU-only cluster: refused at once, naming GPU, never queued.
    engine = RayEngine("too-big", tiny_model_dir, ray_config(ray_cluster, num_gpus=4),
                       engine_kwargs=engine_kwargs())
    async with anyio.create_task_group() as tg:
        await tg.start(engine.run)
        await wait_until(lambda: engine.info().state is EngineState.DEAD, 60)
        tg.cancel_scope.cancel()
    error = engine.info().last_error or ""
    assert "GPU" in error and "no node" in error
    assert engine.placement is None  # nothing was submitted to Ray
    with pytest.raises(EngineError):
        await engine.wait_ready(0.01)

    nodes = cluster_nodes()
    with pytest.raises(Unplaceable) as caught:
        check_placeable(RayRequest("trainer t", num_cpus=1, num_gpus=0,
                                   resources={"tpu_pod": 1}), nodes)
    assert caught.value.data["resource"] == "tpu_pod" and caught.value.code == 1011
    with pytest.raises(Unplaceable) as caught:  # each fits a node, not both on one
        check_placeable(RayRequest("trainer t", num_cpus=1, num_gpus=0,
                                   resources={"daemon_box": 1, "engine_node": 1}), nodes)
    assert caught.value.data["resource"] == "CPU+daemon_box+engine_node"
    check_placeable(RayRequest("trainer t", num_cpus=1, num_gpus=0,
                               resources={"engine_node": 1}), nodes)  # fits: no error


async def test_the_pool_builds_ray_engines_for_vllm_specs_only(
    ray_cluster: Cluster, tiny_model_dir: Path,
) -> None:
    factory = ray_engine_factory(ray_config(ray_cluster), default_engine_factory)
    pool = EnginePool(factory)
    spec = EngineSpec(model=tiny_model_dir, kind="vllm", dtype="auto", max_model_len=512,
                      url=None, api_key_env=None, gpu_memory_utilization=0.5,
                      tensor_parallel_size=1, max_lora_rank=8, max_loras=2)
    pool.add_cluster("c1", spec)
    pool.add_cluster("c2", replace(spec, kind="openai", url="http://127.0.0.1:9/v1"))
    assert isinstance(pool.engine_for("c1"), RayEngine)
    assert not isinstance(pool.engine_for("c2"), RayEngine)
    assert pool.residents() == []  # neither lives on this box's devices


async def test_a_killed_engine_actor_fails_the_eval_in_flight_and_is_restarted(
    ray_engine: RayEngine,
) -> None:
    restarts = ray_engine.info().restarts
    actor: Any = ray_engine._actor
    pid = await actor.__ray_call__.remote(lambda self: os.getpid())
    long_answers = Sampling(temperature=0.0, max_tokens=400)
    prompts = [f"Campaign {n}: explain the pacing." for n in range(32)]

    async def in_flight() -> int:
        count: int = await actor.__ray_call__.remote(
            lambda self: self._engine._llm.get_num_unfinished_requests())
        return count

    async def kill_once_requests_are_in_flight() -> None:
        with anyio.fail_after(30):
            while await in_flight() == 0:  # noqa: ASYNC110 (another process's state)
                await anyio.sleep(0.02)
        os.kill(pid, signal.SIGKILL)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(kill_once_requests_are_in_flight)
            with pytest.raises(EngineError) as caught:
                {i: c async for i, c in ray_engine.generate_many(prompts, long_answers)}
    assert caught.value.data.get("reason") == "dead"
    assert ray_engine.info().state in {EngineState.DEAD, EngineState.LOADING}
    with pytest.raises(EngineError):
        await ray_engine.generate(PROMPTS[0], GREEDY)
    await ray_engine.wait_ready(ENGINE_LOAD_TIMEOUT)
    assert ray_engine.info().restarts == restarts + 1
    assert ray_engine._actor is not actor  # a new actor
    assert (await ray_engine.generate(PROMPTS[0], GREEDY)).text
