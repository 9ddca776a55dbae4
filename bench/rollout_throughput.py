"""GRPO rollout throughput: vLLM against HF generate, the same prompts through the trainer's sampler.

    .venv/bin/python bench/rollout_throughput.py [--prompts 16] [--group 8] [--max-tokens 32]

Builds the 19M-parameter bench Llama (hidden 512, 6 layers, 8 heads, as bench/eval_overhead.py
does) and a TRL ``GRPOTrainer`` with a fresh LoRA adapter on it, then sends the same generation
batch (``--prompts`` prompts x ``--group`` completions, sampled at temperature 1, at most
``--max-tokens`` new tokens each, no resampling) through :class:`RolloutSampler` with each
backend, after one warm-up batch each (the vLLM engine start and the first adapter load are set-up,
not rollout). Prints completion tokens per second for each; the last line is the ratio vLLM/HF.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any


def no_reward(completions: list[Any], **_: Any) -> list[float | None]:
    return [0.0] * len(completions)


def measure(sampler: Any, trainer: Any, rows: list[str]) -> float:
    sampler(rows, trainer)  # warm-up: engine start, adapter load, kernels
    sampler.stats.take()
    started = time.perf_counter()
    output = sampler(rows, trainer)
    elapsed = time.perf_counter() - started
    tokens = sum(len(ids) for ids in output["completion_ids"])
    return tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TRL_EXPERIMENTAL_SILENCE="1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl.trainer.grpo_config import GRPOConfig
    from trl.trainer.grpo_trainer import GRPOTrainer

    from modelsmith.examples import rtb_pricing
    from modelsmith.examples.tinymodel import build_tiny_model
    from modelsmith.gpu.prompting import load_tokenizer, render_prompt
    from modelsmith.gpu.trainer_rollouts import RolloutSampler

    with tempfile.TemporaryDirectory(prefix="ms-rollout-bench-") as scratch:
        root = Path(scratch)
        items = sorted(rtb_pricing.INVENTORY)
        questions = [f"{items[i % len(items)]} in {rtb_pricing.REGIONS[i % 4]} lot {i}. bucket?"
                     for i in range(args.prompts)]
        model_dir = build_tiny_model(root / "model", [*rtb_pricing.corpus(), *questions],
                                     hidden_size=512, num_layers=6, num_heads=8)
        tokenizer = load_tokenizer(model_dir)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        prompts = [render_prompt(tokenizer, [{"role": "user", "content": q}]) for q in questions]
        rows = [p for p in prompts for _ in range(args.group)]
        config = GRPOConfig(output_dir=str(root / "out"), max_steps=1, num_generations=args.group,
                            per_device_train_batch_size=args.group, max_completion_length=args.max_tokens,
                            temperature=1.0, report_to="none", use_cpu=True, disable_tqdm=True)
        model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          task_type="CAUSAL_LM")
        rates: dict[str, float] = {}
        for backend in ("hf", "vllm"):
            sampler = RolloutSampler(
                backend=backend, score=lambda prompt, text: 0.0, tokenizer=tokenizer, group_size=args.group,
                max_completion_length=args.max_tokens, temperature=1.0, max_resample_rounds=0, sync_steps=1,
                work_dir=root / f"work-{backend}", base_model=str(model_dir), device="cpu", dtype="float32",
                lora_rank=8, max_model_len=256, gpu_memory_utilization=0.3, seed=0)
            trainer = GRPOTrainer(model=model, reward_funcs=no_reward,
                                  args=config, train_dataset=Dataset.from_dict({"prompt": prompts}),
                                  processing_class=tokenizer, peft_config=lora if backend == "hf" else None,
                                  rollout_func=sampler)
            model = trainer.model
            rates[backend] = measure(sampler, trainer, rows)
            sampler.close()
    print(f"rollout batch            {args.prompts} prompts x {args.group} completions, "
          f"<= {args.max_tokens} new tokens, temperature 1")
    print(f"HF generate (TRL)        {rates['hf']:.1f} completion tokens/s")
    print(f"vLLM (in-process, LoRA)  {rates['vllm']:.1f} completion tokens/s")
    print(f"vLLM/HF                  {rates['vllm'] / rates['hf']:.2f}x")
    # vLLM's offline engine core can keep the interpreter from exiting; the numbers are out.
    os._exit(0)


if __name__ == "__main__":
    main()
