"""Ray engine overhead: an eval's generation through an engine in a Ray actor vs in-process.

    .venv/bin/python bench/ray_engine_overhead.py [--prompts 64] [--max-tokens 32] [--rounds 5]

Builds the tiny model locally (no hub), starts a local Ray instance (``ray.init(num_cpus=2)``:
this box's two cores) and, in the same run, two warm engines on the same model and settings:
the in-process :class:`~modelsmith.gpu.vllm_engine.VllmEngine` and a
:class:`~modelsmith.gpu.ray_engine.RayEngine` (the same VllmEngine inside an actor that reserves
2 CPUs, so both see the same thread count). The same prompts (greedy: the same work) go through
``generate_many``, as an eval sends its scenarios, ``--rounds`` times each way, alternating.
Prints each pass, the best and the median of each side, and the ratio ray / in-process (target
<= 1.15x on the CPU). The engine not being measured sits idle meanwhile.
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


async def measure(model_dir: Path, address: str, args: argparse.Namespace) -> None:
    local = VllmEngine("local", model_dir, **ENGINE)
    config = RaySection.model_validate({"address": address, "engine": {
        "num_cpus": 2, "num_gpus": 0}})
    remote = RayEngine("ray", model_dir, config, engine_kwargs=ENGINE)
    sampling = Sampling(temperature=0.0, max_tokens=args.max_tokens)
    prompts = [f"Campaign {n}: {CORPUS[n % len(CORPUS)]} What is the CPM?"
               for n in range(args.prompts)]
    times: dict[str, list[float]] = {"in-process": [], "ray actor": []}
    async with anyio.create_task_group() as tg:
        await tg.start(local.run)
        await tg.start(remote.run)
        await local.wait_ready(600)
        await remote.wait_ready(600)
        print(f"warm: in-process {local.info().load_seconds:.1f} s, ray actor "
              f"{remote.info().load_seconds:.1f} s on {remote.info().node}")
        # One warm-up pass each (first-request costs), then the measured rounds.
        _, expected = await one_pass(local, prompts, sampling)
        _, got = await one_pass(remote, prompts, sampling)
        assert got == expected, "the two engines answered differently"
        for round_no in range(args.rounds):
            order = [("in-process", local), ("ray actor", remote)]
            if round_no % 2:
                order.reverse()
            for label, engine in order:
                elapsed, _ = await one_pass(engine, prompts, sampling)
                times[label].append(elapsed)
                print(f"round {round_no + 1} {label:>10}: {elapsed:.3f} s "
                      f"({len(prompts) / elapsed:.1f} prompts/s)")
        tg.cancel_scope.cancel()
    best = {label: min(values) for label, values in times.items()}
    median = {label: statistics.median(values) for label, values in times.items()}
    print(f"in-process engine: best {best['in-process']:.3f} s, median {median['in-process']:.3f} s")
    print(f"ray actor engine:  best {best['ray actor']:.3f} s, median {median['ray actor']:.3f} s")
    ratio = median["ray actor"] / median["in-process"]
    print(f"ratio ray / in-process (median): {ratio:.3f}x "
          f"(best: {best['ray actor'] / best['in-process']:.3f}x; target <= 1.15x)")


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
