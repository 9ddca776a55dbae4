"""One short check of the GPU path on a CUDA box: trainer memory, step time, sleep/wake, hot load.

    .venv/bin/python bench/gpu_check.py             # CUDA: bf16, 8 steps
    .venv/bin/python bench/gpu_check.py --dry-run   # the same flow on the CPU (float32, 2 steps)

Builds the tiny model locally, runs the real trainer child (``python -m modelsmith.gpu.trainer``)
for a few GRPO steps with HF rollouts, and prints the device, dtype, step time, peak and released
device memory (the child's ``released`` event). With vLLM importable it then starts the
in-process engine on the same model, puts it to sleep and wakes it (sleep mode is real only on
CUDA), hot-loads the new adapter and replays its ``canaries.json`` (the hot-load check); without
vLLM it says so and checks the trainer alone. The last line is ``gpu_check: ok`` or
``gpu_check: FAILED (...)``; the exit status is 0 only for ok.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from modelsmith.examples import rtb_pricing
from modelsmith.examples.tinymodel import build_tiny_model
from modelsmith.gpu.trainer_process import run_trainer
from modelsmith.gpu.trainer_spec import (
    ConvergenceSpec,
    GrpoSpec,
    LoraSpec,
    RolloutSpec,
    TrainerEvent,
    TrainerMetric,
    TrainerReleased,
    TrainerStarted,
    TrainJobSpec,
)

# Released memory above this is a leak worth a look (CUDA context and allocator slack aside).
LEAK_BYTES = 64 * 2**20


def _spec(model: Path, work: Path, *, dry_run: bool, steps: int) -> TrainJobSpec:
    # The set is the file's folder in a cluster; the trainer's spec names it per scenario.
    scenarios = [{**s, "set": "core"} for s in rtb_pricing.scenarios("core", 4, seed=0)]
    return TrainJobSpec(
        job_id="gpu-check",
        cluster="gpu-check",
        base_model=str(model),
        output_dir=str(work / "adapters" / "iter-1"),
        work_dir=str(work / "train"),
        scenarios=scenarios,
        lora=LoraSpec(r=8, alpha=16, dropout=0.0),
        grpo=GrpoSpec(max_steps=steps, learning_rate=1e-4, num_generations=2,
                      per_device_train_batch_size=2, max_prompt_length=128,
                      max_completion_length=8, save_steps=max(steps, 1)),
        convergence=ConvergenceSpec(min_steps=steps),
        rollout=RolloutSpec(backend="hf"),
        canaries=2,
        device="cpu" if dry_run else "cuda",
        bf16=False if dry_run else True,
    )


def _mib(value: int | None) -> str:
    return "n/a (CPU)" if value is None else f"{value / 2**20:.1f} MiB"


async def _check_engine(model: Path, adapter: Path, lines: list[str]) -> str | None:
    """Sleep/wake and a verified hot load on the real engine; a problem, or None."""
    from modelsmith.errors import ModelsmithError
    from modelsmith.gpu.canary import verify_canaries
    from modelsmith.gpu.engine import EngineState
    from modelsmith.gpu.vllm_engine import VllmEngine, cpu_engine_env

    os.environ.update(cpu_engine_env())
    engine = VllmEngine("gpu-check", model, max_model_len=256, max_lora_rank=8, max_loras=1,
                        gpu_memory_utilization=0.3)
    problem: str | None = None
    async with anyio.create_task_group() as tg:
        await tg.start(engine.run)
        try:
            started = time.monotonic()
            await engine.wait_ready(timeout=600)
            lines.append(f"engine ready           {time.monotonic() - started:.1f} s")
            await engine.sleep(1)
            slept = engine.info().state is EngineState.SLEEPING
            await engine.wake_up()
            woke = engine.info().state is EngineState.WARM
            lines.append(f"sleep/wake             exercised (sleeping: {slept}, warm again: {woke})")
            if not (slept and woke):
                problem = "sleep/wake did not change the engine's state"
            loaded = time.monotonic()
            await engine.load_adapter("gpu-check:iter-1", adapter)
            check = await verify_canaries(engine, "gpu-check:iter-1", adapter)
            lines.append(f"adapter hot-load       exercised in {time.monotonic() - loaded:.2f} s; "
                         f"canaries {check.status} ({check.canaries}, max |dlogprob| "
                         f"{check.max_logprob_diff}, tolerance {check.tolerance}"
                         + (f"; {check.reason}" if check.reason else "") + ")")
        except ModelsmithError as exc:
            problem = f"engine: {exc.name}: {exc.message}"
        finally:
            tg.cancel_scope.cancel()
    return problem


async def _main(args: argparse.Namespace) -> int:
    lines: list[str] = []
    problems: list[str] = []
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: FAILED (no CUDA device visible; use --dry-run on a CPU)")
            return 1
        lines.append(f"device                 {torch.cuda.get_device_name(0)}")
    with tempfile.TemporaryDirectory(prefix="ms-gpu-check-") as scratch:
        root = Path(scratch)
        model = build_tiny_model(root / "model", rtb_pricing.corpus())
        steps = args.steps or (2 if args.dry_run else 8)
        spec = _spec(model, root, dry_run=args.dry_run, steps=steps)
        seen: dict[str, Any] = {"metrics": []}

        def on_event(event: TrainerEvent) -> None:
            if isinstance(event, TrainerMetric):
                seen["metrics"].append(event)
            elif isinstance(event, TrainerStarted):
                seen["started"] = event
            elif isinstance(event, TrainerReleased):
                seen["released"] = event

        began = time.monotonic()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        outcome = await run_trainer(spec, on_event=on_event, log_path=root / "train.log", env=env)
        wall = time.monotonic() - began
        started: TrainerStarted | None = seen.get("started")
        metrics: list[TrainerMetric] = seen["metrics"]
        released: TrainerReleased | None = seen.get("released")
        step_times = [m.seconds_per_step for m in metrics if m.seconds_per_step is not None]
        lines.append(f"trainer                {started.device if started else '?'} "
                     f"{started.dtype if started else '?'}, {len(metrics)} steps in {wall:.1f} s "
                     f"(stop: {outcome.stopped.reason if outcome.stopped else 'none'})")
        if step_times:
            lines.append(f"step time              {sum(step_times) / len(step_times):.3f} s "
                         f"mean, {max(step_times):.3f} s max")
        if released is None:
            problems.append("the trainer sent no released event")
        else:
            lines.append(f"peak device memory     {_mib(released.peak_device_bytes)}")
            lines.append(f"released (final)       {_mib(released.final_device_bytes)}")
            final = released.final_device_bytes
            if final is not None and final > LEAK_BYTES:
                problems.append(f"{final / 2**20:.0f} MiB still allocated after training")
        if outcome.adapter_path is None:
            problems.append("no adapter saved")
        elif importlib.util.find_spec("vllm") is None:
            lines.append("sleep/wake             not exercised: vLLM is not installed here")
            lines.append("adapter hot-load       not exercised: vLLM is not installed here "
                         "(checked the trainer alone)")
        elif args.no_engine:
            lines.append("sleep/wake, hot-load   skipped (--no-engine)")
        else:
            problem = await _check_engine(model, outcome.adapter_path, lines)
            if problem:
                problems.append(problem)
    for line in lines:
        print(line)
    print("gpu_check: ok" if not problems else f"gpu_check: FAILED ({'; '.join(problems)})")
    return 0 if not problems else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="run the same flow on the CPU (float32, tiny steps)")
    parser.add_argument("--steps", type=int, default=0, help="GRPO steps (default 8, dry run 2)")
    parser.add_argument("--no-engine", action="store_true",
                        help="check the trainer alone even when vLLM is installed")
    args = parser.parse_args()
    sys.exit(anyio.run(_main, args))


if __name__ == "__main__":
    main()
