"""Canary replay and the thinking switch on the real vLLM engine (CPU build, tiny model)."""

from __future__ import annotations

import shutil
from pathlib import Path

import anyio
import pytest

from modelsmith.errors import EngineError
from modelsmith.gpu.canary import Canary, CanaryFile, read_canaries, verify_canaries, write_canaries
from modelsmith.gpu.engine import ReplaysTokens, Sampling
from modelsmith.gpu.prompting import load_tokenizer, render_prompt
from modelsmith.gpu.vllm_engine import VllmEngine

from .conftest import ENGINE_LOAD_TIMEOUT
from .thinking_model import thinking_model

pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="session")]

PROMPTS = ("What is the click-through rate?", "Explain budget pacing.")
NO_THINKING = {"enable_thinking": False}


async def test_canaries_pass_on_the_loaded_adapter_and_a_tampered_file_fails_typed(
    tiny_model_dir: Path, perturbed_adapter_dir: Path, tmp_path: Path
) -> None:
    model_dir = thinking_model(tiny_model_dir, tmp_path / "model")
    adapter_dir = tmp_path / "adapter"
    shutil.copytree(perturbed_adapter_dir, adapter_dir)
    tokenizer = load_tokenizer(model_dir)
    engine = VllmEngine("canary", model_dir, max_model_len=256, max_lora_rank=8, max_loras=2)
    assert isinstance(engine, ReplaysTokens)
    async with anyio.create_task_group() as tg:
        await tg.start(engine.run)
        await engine.wait_ready(timeout=ENGINE_LOAD_TIMEOUT)
        await engine.load_adapter("c:iter-1", adapter_dir)

        # The engine renders with the cluster's template variables: its answer equals the
        # replay of exactly that text, with and without the switch.
        for kwargs in ({}, NO_THINKING):
            text = render_prompt(tokenizer, PROMPTS[0], chat_template_kwargs=kwargs)
            sampling = Sampling(max_tokens=8, chat_template_kwargs=kwargs)
            answer = await engine.generate(PROMPTS[0], sampling, adapter="c:iter-1")
            replay = await engine.generate_tokens(text, Sampling(max_tokens=8),
                                                  adapter="c:iter-1")
            assert answer.text == replay.text
            assert len(replay.token_logprobs) == len(replay.token_ids) == answer.token_count

        assert (await verify_canaries(engine, "c:iter-1", adapter_dir)).status == "unverified"

        canaries = []
        for index, prompt in enumerate(PROMPTS):
            text = render_prompt(tokenizer, prompt, chat_template_kwargs=NO_THINKING)
            recorded = await engine.generate_tokens(text, Sampling(max_tokens=6),
                                                    adapter="c:iter-1")
            canaries.append(Canary(scenario_id=f"s{index}", prompt_text=text,
                                   completion_text=recorded.text,
                                   completion_token_ids=recorded.token_ids,
                                   token_logprobs=recorded.token_logprobs))
        write_canaries(adapter_dir, CanaryFile(format=1, tolerance=1e-3, canaries=canaries))
        check = await verify_canaries(engine, "c:iter-1", adapter_dir)
        assert check.status == "verified" and check.canaries == 2
        assert check.max_logprob_diff is not None and check.max_logprob_diff <= 1e-3

        # The base model answers otherwise: the canaries name the adapter they belong to.
        await engine.load_adapter("c:other", tiny_adapter_like(adapter_dir, tmp_path))
        with pytest.raises(EngineError) as wrong_adapter:
            await verify_canaries(engine, "c:other", adapter_dir)
        assert wrong_adapter.value.data["reason"] == "canary_mismatch"

        tampered = read_canaries(adapter_dir)
        assert tampered is not None
        bent = tampered.canaries[1]
        logprobs = [bent.token_logprobs[0] - 0.5, *bent.token_logprobs[1:]]
        write_canaries(adapter_dir, CanaryFile(format=1, tolerance=1e-3, canaries=[
            tampered.canaries[0],
            Canary(scenario_id=bent.scenario_id, prompt_text=bent.prompt_text,
                   completion_text=bent.completion_text,
                   completion_token_ids=bent.completion_token_ids, token_logprobs=logprobs)]))
        with pytest.raises(EngineError) as failed:
            await verify_canaries(engine, "c:iter-1", adapter_dir)
        assert failed.value.data["canary"] == "s1"
        assert failed.value.data["reason"] == "canary_mismatch"
        assert failed.value.data["mismatch"] == "logprob" and failed.value.data["position"] == 0
        tg.cancel_scope.cancel()


def tiny_adapter_like(adapter_dir: Path, tmp_path: Path) -> Path:
    """The same adapter with its weights scaled down: another adapter of the same shape."""
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other-adapter"
    shutil.copytree(adapter_dir, other)
    weights = other / "adapter_model.safetensors"
    tensors = {name: tensor * 0.1 for name, tensor in load_file(str(weights)).items()}
    save_file(tensors, str(weights))
    (other / "canaries.json").unlink(missing_ok=True)
    return other
