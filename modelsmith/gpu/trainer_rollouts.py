"""GRPO rollouts for the trainer child: vLLM or HF generate, with uniform groups resampled.

TRL calls :meth:`RolloutSampler.__call__` (its ``rollout_func``) with one generation batch of
prompts, each repeated ``num_generations`` times in a row (one group per prompt). The sampler:

1. generates one completion per row with the chosen backend:

   - ``vllm``: an offline ``vllm.LLM`` in this process built with LoRA on; every ``sync_steps``
     optimiser steps the in-training adapter is saved to ``work_dir/rollout-adapter/step-N`` and
     sent as a new ``LoRARequest`` (a new id each time, so vLLM never serves a cached older
     adapter). On CUDA the engine is built with sleep mode and sleeps (level 1: weights to host
     memory, KV cache dropped) between rollouts, so the optimiser step has the device memory.
   - ``hf``: TRL's own transformers ``generate`` path (``GRPOTrainer._generate_single_turn``).

2. scores every completion with the scenario's rubric and regenerates each *uniform* group (all
   completions with the same reward: zero advantage, no gradient) up to ``max_resample_rounds``
   times, keeping a redraw only when it is informative. The bound on extra rollouts per
   generation batch is therefore ``max_resample_rounds * batch_rows`` completions (at most that
   many on a step where every group stays uniform; none when no group is uniform).

The rubric rewards travel to the reward function as the extra field ``rubric_rewards`` so a
completion is scored once. :class:`RolloutStats` holds the per-step counts the metric event
reports (share of uniform groups at first draw, extra rollouts).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = ["RolloutBackend", "RolloutSampler", "RolloutStats", "uniform_groups"]

RolloutBackend = Literal["vllm", "hf"]
ROLLOUT_ADAPTER_DIR = "rollout-adapter"
# Completions of a group whose rewards differ by less than this count as the same reward.
_REWARD_EPSILON = 1e-9


def uniform_groups(rewards: list[float], group_size: int) -> list[int]:
    """Indices of the groups (``group_size`` consecutive rewards each) with one reward value."""
    found = []
    for group in range(len(rewards) // group_size):
        values = rewards[group * group_size : (group + 1) * group_size]
        if max(values) - min(values) <= _REWARD_EPSILON:
            found.append(group)
    return found


@dataclass
class RolloutStats:
    """Counts since the last :meth:`take` (one logged step)."""

    groups: int = 0
    uniform_first_draw: int = 0
    uniform_final: int = 0
    extra_rollouts: int = 0
    completion_tokens: int = 0
    generate_seconds: float = 0.0

    def take(self) -> RolloutStats:
        """These counts, and zero them for the next step."""
        taken = RolloutStats(**vars(self))
        for name in vars(self):
            setattr(self, name, type(getattr(self, name))())
        return taken

    @property
    def uniform_first_draw_share(self) -> float | None:
        return self.uniform_first_draw / self.groups if self.groups else None


@dataclass
class _Generated:
    completion_ids: list[list[int]]


class RolloutSampler:
    """TRL's ``rollout_func``: see the module docstring."""

    __name__ = "modelsmith_rollouts"

    def __init__(
        self,
        *,
        backend: RolloutBackend,
        score: Callable[[str, str], float],
        tokenizer: Any,
        group_size: int,
        max_completion_length: int,
        temperature: float,
        max_resample_rounds: int,
        sync_steps: int,
        work_dir: Path,
        base_model: str,
        device: str,
        dtype: str,
        lora_rank: int,
        max_model_len: int,
        gpu_memory_utilization: float,
        seed: int,
        score_many: Callable[[list[str], list[str]], list[float]] | None = None,
    ) -> None:
        self.backend = backend
        self.score = score  # (rendered prompt, completion text) -> reward
        # The same for a whole batch at once (judges are asked for the batch together).
        self.score_many = score_many
        self.tokenizer = tokenizer
        self.group_size = group_size
        self.max_completion_length = max_completion_length
        self.temperature = temperature
        self.max_resample_rounds = max_resample_rounds
        self.sync_steps = max(1, sync_steps)
        self.adapter_root = work_dir / ROLLOUT_ADAPTER_DIR
        self.stats = RolloutStats()
        self._llm: Any = None
        self._lora: Any = None
        self._lora_step = -1
        self._sleeps = device == "cuda"
        self._llm_args: dict[str, Any] = {
            "model": base_model,
            "dtype": dtype,
            "enable_lora": True,
            "max_lora_rank": max(8, lora_rank),
            "max_loras": 1,
            "max_model_len": max_model_len,
            "enforce_eager": device != "cuda",
            "gpu_memory_utilization": gpu_memory_utilization,
            "enable_sleep_mode": self._sleeps,
            "seed": seed,
        }

    # -- backends ---------------------------------------------------------------------------
    def start(self) -> None:
        """Build the vLLM engine (before the first step, so its start is not inside a step)."""
        if self.backend != "vllm" or self._llm is not None:
            return
        from vllm import LLM

        self._llm = LLM(**self._llm_args)
        if self._sleeps:
            self._llm.sleep(level=1)

    def close(self) -> None:
        """Drop the engine and the rollout adapters (the process is about to exit)."""
        if self._llm is not None:
            engine = getattr(self._llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if callable(shutdown):
                shutdown()
            self._llm = None
        shutil.rmtree(self.adapter_root, ignore_errors=True)

    def _sync_adapter(self, trainer: Any) -> None:
        from vllm.lora.request import LoRARequest

        step = int(trainer.state.global_step)
        if self._lora is not None and step - self._lora_step < self.sync_steps:
            return
        path = self.adapter_root / f"step-{step}"
        shutil.rmtree(path, ignore_errors=True)
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(str(path))
        if self._lora is not None:
            shutil.rmtree(self._lora.lora_path, ignore_errors=True)
        # A new id per sync: vLLM caches adapters (and prefixes) by id.
        self._lora = LoRARequest(f"rollout-{step}", step + 1, str(path))
        self._lora_step = step

    def _generate_vllm(self, prompt_ids: list[list[int]], trainer: Any) -> _Generated:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.start()
        self._sync_adapter(trainer)
        params = SamplingParams(
            n=1, temperature=self.temperature, max_tokens=self.max_completion_length
        )
        if self._sleeps:
            self._llm.wake_up()
        try:
            outputs = self._llm.generate(
                [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids],
                params,
                lora_request=self._lora,
                use_tqdm=False,
            )
        finally:
            if self._sleeps:
                self._llm.sleep(level=1)
        return _Generated([list(out.outputs[0].token_ids) for out in outputs])

    def _generate_hf(self, prompt_ids: list[list[int]], trainer: Any) -> _Generated:
        completion_ids, _ = trainer._generate_single_turn(prompt_ids, None, {}, 1)
        return _Generated([list(ids) for ids in completion_ids])

    def _generate(self, prompt_ids: list[list[int]], trainer: Any) -> list[list[int]]:
        started = time.perf_counter()
        if self.backend == "vllm":
            generated = self._generate_vllm(prompt_ids, trainer)
        else:
            generated = self._generate_hf(prompt_ids, trainer)
        self.stats.generate_seconds += time.perf_counter() - started
        self.stats.completion_tokens += sum(len(ids) for ids in generated.completion_ids)
        return generated.completion_ids

    # -- TRL's rollout_func -----------------------------------------------------------------
    def _rewards(self, prompts: list[str], completion_ids: list[list[int]]) -> list[float]:
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        if self.score_many is not None:
            return self.score_many(list(prompts), list(texts))
        return [self.score(p, t) for p, t in zip(prompts, texts, strict=True)]

    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, Any]:
        prompt_ids, _, _ = trainer._tokenize_prompts(prompts)
        prompt_ids = [list(ids) for ids in prompt_ids]
        completion_ids = self._generate(prompt_ids, trainer)
        rewards = self._rewards(prompts, completion_ids)
        size = self.group_size
        uniform = uniform_groups(rewards, size)
        self.stats.groups += len(rewards) // size
        self.stats.uniform_first_draw += len(uniform)
        for _ in range(self.max_resample_rounds):
            if not uniform:
                break
            rows = [g * size + i for g in uniform for i in range(size)]
            redrawn = self._generate([prompt_ids[r] for r in rows], trainer)
            self.stats.extra_rollouts += len(rows)
            redrawn_rewards = self._rewards([prompts[r] for r in rows], redrawn)
            still_uniform = []
            for k, group in enumerate(uniform):
                values = redrawn_rewards[k * size : (k + 1) * size]
                if max(values) - min(values) <= _REWARD_EPSILON:
                    still_uniform.append(group)
                    continue
                for i in range(size):
                    completion_ids[group * size + i] = redrawn[k * size + i]
                    rewards[group * size + i] = values[i]
            uniform = still_uniform
        self.stats.uniform_final += len(uniform)
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": completion_ids,
            "logprobs": None,
            "rubric_rewards": rewards,
        }
