"""Ray engine overhead: an eval's generation through an engine in a Ray actor vs in-process.

    .venv/bin/python bench/ray_engine_overhead.py [--prompts 64] [--max-tokens 32] [--rounds 5]

Builds the tiny model locally (no hub), starts a local Ray instance (``ray.init(num_cpus=2)``:
this box's two cores) and, in the same run, engines on the same model and settings:
the in-process :class:`~modelsmith.gpu.vllm_engine.VllmEngine` and a
:class:`~modelsmith.gpu.ray_engine.RayEngine` (the same VllmEngine inside an actor that reserves
2 CPUs, so both see the same thread count). The same prompts (greedy: the same work) go through
``generate_many``, as an eval sends its scenarios, ``--rounds`` times each, one engine at a time
(in-process, Ray actor, in-process again: an idle engine on a 2-core box still takes cycles from
the measured one). Prints each pass, the best and the median of each side, and the ratio
ray / in-process (target <= 1.15x on the CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import anyio

from modelsmith.examples.tinymodel import build_tiny_model
from modelsmith.gpu.engine import Engine, Sampling
from modelsmith.gpu.ray_config import RaySection
from modelsmith.gpu.ray_engine import RayEngine
from modelsmith.gpu.vllm_engine import VllmEngine, cpu_engine_env

CORPUS = (
    "What is the click-through rate of a campaign with 40 clicks and 2000 impressions? 0.02",
    "The bid floor for the premium display inventory is 1.25 USD CPM.",
    "Budget pacing spreads a daily budget of 500 USD evenly across 24 hours.",
    "Conversion rate equals conversions divided by clicks.",
    "Effective CPM is revenue divided by impressions times 1000.",
)
ENGINE = {"max_model_len": 512, "max_lora_rank": 8, "max_loras": 2}


async def one_pass(engine: Engine, prompts: list[str], sampling: Sampling) -> tuple[float, list[str]]:
    answers: dict[int, str] = {}
    started = time.perf_counter()
    async for index, completion in engine.generate_many(prompts, sampling):
        answers[index] = completion.text
    elapsed = time.perf_counter() - started
    assert len(answers) == len(prompts)
    return elapsed, [answers[i] for i in range(len(prompts))]


async def passes(engine: Engine, prompts: list[str], sampling: Sampling, label: str,
                 rounds: int) -> tuple[list[float], list[str]]:
    """Serve ``engine`` alone: one warm-up pass (first-request costs), then ``rounds`` passes."""
    async with anyio.create_task_group() as tg:
        await tg.start(engine.run)
        await engine.wait_ready(600)
        info = engine.info()
        print(f"{label}: warm in {info.load_seconds:.1f} s" + (f" on {info.node}" if info.node else ""))
        _, answers = await one_pass(engine, prompts, sampling)
        times = []
        for round_no in range(rounds):
            elapsed, _ = await one_pass(engine, prompts, sampling)
            times.append(elapsed)
            print(f"  {label} pass {round_no + 1}: {elapsed:.3f} s ({len(prompts) / elapsed:.1f} prompts/s)")
        tg.cancel_scope.cancel()
    return times, answers


async def measure(model_dir: Path, address: str, args: argparse.Namespace) -> None:
    config = RaySection.model_validate({"address": address, "engine": {
        "num_cpus": 2, "num_gpus": 0}})
    sampling = Sampling(temperature=0.0, max_tokens=args.max_tokens)
    prompts = [f"Campaign {n}: {CORPUS[n % len(CORPUS)]} What is the CPM?"
               for n in range(args.prompts)]
    # One engine at a time (two engines on two cores steal each other's cycles even when one is
    # idle), bracketed: in-process, Ray actor, in-process again, so drift of the box shows.
    first, expected = await passes(VllmEngine("local", model_dir, **ENGINE), prompts, sampling,
                                   "in-process", args.rounds)
    remote, got = await passes(RayEngine("ray", model_dir, config, engine_kwargs=ENGINE),
                               prompts, sampling, "ray actor", args.rounds)
    again, _ = await passes(VllmEngine("local", model_dir, **ENGINE), prompts, sampling,
                            "in-process", args.rounds)
    assert got == expected, "the two engines answered differently"
    local = first + again
    print(f"in-process engine: best {min(local):.3f} s, median {statistics.median(local):.3f} s "
          f"(first {statistics.median(first):.3f} s, again {statistics.median(again):.3f} s)")
    print(f"ray actor engine:  best {min(remote):.3f} s, median {statistics.median(remote):.3f} s")
    ratio = statistics.median(remote) / statistics.median(local)
    print(f"ratio ray / in-process (median): {ratio:.3f}x "
          f"(best: {min(remote) / min(local):.3f}x; target <= 1.15x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    os.environ.update(cpu_engine_env())
    import ray

    with tempfile.TemporaryDirectory(prefix="ms-ray-bench-") as tmp:
        model_dir = build_tiny_model(Path(tmp) / "model", CORPUS * 8)
        context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                           namespace="modelsmith-bench")
        try:
            asyncio.run(measure(model_dir, context.address_info["gcs_address"], args))
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
