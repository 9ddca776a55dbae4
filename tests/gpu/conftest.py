"""Shared, heavy fixtures for the gpu/ tests: one tiny model per session, one warm vLLM engine."""

from __future__ import annotations

import os

# Never reach a model hub, whatever a library tries: set before transformers or vLLM is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import pytest

from modelsmith.examples.tinymodel import build_tiny_model
from modelsmith.gpu.vllm_engine import VllmEngine, cpu_engine_env

# The engine's environment (small KV cache on CPU, no usage statistics) before vLLM is imported.
os.environ.update(cpu_engine_env())

# Building an engine takes ~15 s on an idle 2-core machine; allow for a busy one.
ENGINE_LOAD_TIMEOUT = 300.0

ADTECH_CORPUS: tuple[str, ...] = (
    "What is the click-through rate of a campaign with 40 clicks and 2000 impressions? 0.02",
    "The bid floor for the premium display inventory is 1.25 USD CPM.",
    "Budget pacing spreads a daily budget of 500 USD evenly across 24 hours.",
    "Conversion rate equals conversions divided by clicks.",
    "A second-price auction charges the winner the second highest bid plus one cent.",
    "Frequency capping limits a user to 3 impressions per day for this line item.",
    'Return JSON: {"campaign": "spring-sale", "status": "paused", "cpm": 2.5}',
    "Viewability requires 50% of pixels in view for at least one second.",
    "Which channel performs best: search, display or video? Answer with one word.",
    "Effective CPM is revenue divided by impressions times 1000.",
)


@pytest.fixture(scope="session")
def corpus() -> tuple[str, ...]:
    return ADTECH_CORPUS


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama + tokenizer built once per session (read-only for tests: copy to mutate)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model", ADTECH_CORPUS * 4)


def make_perturbed_adapter(model_dir: Path, out_dir: Path) -> Path:
    """A PEFT LoRA adapter whose (normally zero) B matrices are random, so it changes answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"],
    )
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    model.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="session")
def perturbed_adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-8 LoRA adapter for the tiny model that visibly changes its answers."""
    return make_perturbed_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "perturbed")


@pytest.fixture(scope="session")
async def vllm_engine(tiny_model_dir: Path) -> AsyncIterator[VllmEngine]:
    """One warm in-process vLLM engine on the tiny model, shared by the whole session."""
    engine = VllmEngine(
        "tiny",
        tiny_model_dir,
        max_model_len=512,
        max_lora_rank=8,
        max_loras=2,
        restart_backoff=0.1,
        shutdown_timeout=30,
    )
    stop = anyio.Event()

    async def host_engine_service() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            await stop.wait()
            tg.cancel_scope.cancel()

    # pytest-asyncio runs a fixture's setup and its teardown in two different tasks, and a task
    # group must be left by the task that entered it: so the session's task group lives in a
    # host task of its own. This is the harness boundary, the one free-standing task in tests.
    host = asyncio.get_running_loop().create_task(host_engine_service())
    try:
        await engine.wait_ready(timeout=ENGINE_LOAD_TIMEOUT)
        yield engine
    finally:
        stop.set()
        with anyio.fail_after(120):
            await host


async def wait_until(condition: Callable[[], bool], deadline_s: float) -> None:
    """Poll ``condition`` until true, failing after ``deadline_s``: for state that another
    process changes and that offers nothing to await (a bounded wait, never a fixed sleep)."""
    with anyio.fail_after(deadline_s):
        while not condition():  # noqa: ASYNC110 (another process's state: nothing to await)
            await anyio.sleep(0.02)
