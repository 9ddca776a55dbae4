"""The in-process vLLM engine: real vLLM on the CPU with the tiny model."""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from modelsmith.errors import EngineError, NotFound
from modelsmith.gpu.engine import Completion, Engine, EngineState, PromptInput, Sampling
from modelsmith.gpu.vllm_engine import VllmEngine

from .conftest import ENGINE_LOAD_TIMEOUT, wait_until

pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="session")]

GREEDY = Sampling(temperature=0.0, max_tokens=12)
PROMPTS: list[PromptInput] = [
    "What is the click-through rate?",
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Bid floor?"}],
    "Explain budget pacing.",
    "Which channel performs best?",
]


async def collect(
    engine: Engine, prompts: Sequence[PromptInput], sampling: Sampling
) -> list[Completion]:
    results: dict[int, Completion] = {}
    async for index, completion in engine.generate_many(prompts, sampling):
        results[index] = completion
    return [results[i] for i in range(len(prompts))]


def answers(completions: Sequence[Completion]) -> list[tuple[str, int, str, int | None]]:
    """What a completion says (its timing differs from run to run)."""
    return [(c.text, c.token_count, c.finish_reason, c.completion_tokens) for c in completions]


async def test_engine_satisfies_the_protocol_and_reports_warm(vllm_engine: VllmEngine) -> None:
    assert isinstance(vllm_engine, Engine)
    info = vllm_engine.info()
    assert info.state is EngineState.WARM
    assert info.kind == "vllm"
    assert info.pid is not None and info.load_seconds is not None
    assert await vllm_engine.health()


async def test_generate_and_generate_many_return_text(vllm_engine: VllmEngine) -> None:
    single = await vllm_engine.generate("What is the click-through rate?", GREEDY)
    assert single.text and 1 <= single.token_count <= 12
    assert single.finish_reason in {"stop", "length"}

    seen: list[int] = []
    async for index, completion in vllm_engine.generate_many(PROMPTS, GREEDY):
        seen.append(index)
        assert completion.token_count >= 1
    assert sorted(seen) == list(range(len(PROMPTS)))


async def test_greedy_and_seeded_sampling_are_deterministic(vllm_engine: VllmEngine) -> None:
    first = await collect(vllm_engine, PROMPTS, GREEDY)
    second = await collect(vllm_engine, PROMPTS, GREEDY)
    assert answers(first) == answers(second)

    seeded = Sampling(temperature=1.0, top_p=0.95, max_tokens=12, seed=7)
    one = await vllm_engine.generate("Explain budget pacing.", seeded)
    two = await vllm_engine.generate("Explain budget pacing.", seeded)
    assert answers([one]) == answers([two])


async def test_lora_adapter_loads_into_the_running_engine_and_changes_answers(
    vllm_engine: VllmEngine, perturbed_adapter_dir: Path
) -> None:
    adapter_dir = perturbed_adapter_dir
    pid_before = vllm_engine.info().pid
    base = await collect(vllm_engine, PROMPTS, GREEDY)

    await vllm_engine.load_adapter("perturbed", adapter_dir)
    await vllm_engine.load_adapter("perturbed", adapter_dir)  # same name and path: no-op
    assert vllm_engine.info().adapters == ["perturbed"]
    assert vllm_engine.info().pid == pid_before  # no restart

    adapted = [
        await vllm_engine.generate(prompt, GREEDY, adapter="perturbed") for prompt in PROMPTS
    ]
    assert [c.text for c in adapted] != [c.text for c in base]
    async for index, completion in vllm_engine.generate_many(PROMPTS, GREEDY, adapter="perturbed"):
        assert answers([completion]) == answers([adapted[index]])

    await vllm_engine.unload_adapter("perturbed")
    assert vllm_engine.info().adapters == []
    with pytest.raises(NotFound):
        await vllm_engine.generate(PROMPTS[0], GREEDY, adapter="perturbed")
    with pytest.raises(NotFound):
        await vllm_engine.unload_adapter("perturbed")
    assert answers(await collect(vllm_engine, PROMPTS, GREEDY)) == answers(base)


async def test_loading_a_directory_without_an_adapter_is_not_found(
    vllm_engine: VllmEngine, tmp_path: Path
) -> None:
    with pytest.raises(NotFound):
        await vllm_engine.load_adapter("nothing", tmp_path)


async def test_a_sleeping_engine_refuses_generation_until_woken(vllm_engine: VllmEngine) -> None:
    await vllm_engine.sleep(1)
    try:
        assert vllm_engine.info().state is EngineState.SLEEPING
        with pytest.raises(EngineError):
            await vllm_engine.generate("Bid floor?", GREEDY)
    finally:
        await vllm_engine.wake_up()
    assert vllm_engine.info().state is EngineState.WARM
    assert (await vllm_engine.generate("Bid floor?", GREEDY)).text


async def test_a_killed_engine_core_fails_requests_in_flight_and_is_restarted(
    vllm_engine: VllmEngine,
) -> None:
    pid = vllm_engine.info().pid
    restarts = vllm_engine.info().restarts
    assert pid is not None
    long_answers = Sampling(temperature=0.0, max_tokens=400)
    prompts = [f"Campaign {n}: explain the pacing." for n in range(32)]
    llm: Any = vllm_engine._llm  # to see when the requests have reached the engine core

    async def kill_once_requests_are_in_flight() -> None:
        await wait_until(lambda: llm.get_num_unfinished_requests() > 0, deadline_s=30)
        os.kill(pid, signal.SIGKILL)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(kill_once_requests_are_in_flight)
            with pytest.raises(EngineError):
                await collect(vllm_engine, prompts, long_answers)

    assert vllm_engine.info().state in {EngineState.DEAD, EngineState.LOADING}
    assert vllm_engine.info().last_error
    assert not await vllm_engine.health()
    with pytest.raises(EngineError):
        await vllm_engine.generate("Bid floor?", GREEDY)

    await vllm_engine.wait_ready(timeout=ENGINE_LOAD_TIMEOUT)
    info = vllm_engine.info()
    assert info.state is EngineState.WARM
    assert info.restarts == restarts + 1
    assert info.pid is not None and info.pid != pid
    assert (await vllm_engine.generate("Bid floor?", GREEDY)).text


async def test_run_reports_started_at_once_and_cancelling_it_stops_the_engine_core(
    tiny_model_dir: Path,
) -> None:
    engine = VllmEngine("short-lived", tiny_model_dir, max_model_len=256, max_lora_rank=8)
    assert engine.info().state is EngineState.COLD
    loop_turns = 0

    async def count_loop_turns() -> None:
        nonlocal loop_turns
        while True:
            await anyio.sleep(0.05)
            loop_turns += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(count_loop_turns)
        with anyio.fail_after(5):
            await tg.start(engine.run)
        assert engine.info().state is EngineState.LOADING
        await engine.wait_ready(timeout=ENGINE_LOAD_TIMEOUT)
        # The event loop kept running while the engine loaded.
        assert loop_turns >= 10
        pid = engine.info().pid
        assert pid is not None
        tg.cancel_scope.cancel()

    assert engine.info().state is EngineState.COLD
    assert engine.info().pid is None
    assert not await anyio.Path(f"/proc/{pid}").exists()
    with pytest.raises(EngineError):
        await engine.generate("Bid floor?", GREEDY)
