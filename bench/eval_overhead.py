"""Eval overhead: a full ``modelsmith eval`` through the daemon against raw vLLM generation.

    .venv/bin/python bench/eval_overhead.py [--prompts 512] [--max-tokens 32]

The same N chat prompts with the same greedy sampling, on a 19M-parameter Llama (hidden 512,
6 layers, 8 heads) built locally, measured three ways, each in a fresh process so engines do
not compete: (1) raw offline ``vllm.LLM.chat`` (one batch call), (2) raw ``AsyncLLM`` through
``VllmEngine.generate_many`` alone, (3) ``eval.run`` -> job finished on a real daemon (socket,
engine, rubric scoring, results.jsonl and summary written). Engine start is excluded from all
three. Prints the times and the ratios (target: eval <= 1.10x raw LLM.generate).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

SYSTEM = "You price real-time bids. Answer with one word: low, mid or high."
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1"}


def prompts(n: int) -> list[str]:
    from modelsmith.examples import rtb_pricing

    items = sorted(rtb_pricing.INVENTORY)
    return [f"{items[i % len(items)]} in {rtb_pricing.REGIONS[i % 4]} lot {i}. bucket?" for i in range(n)]


def scenario(i: int, prompt: str, set_name: str) -> dict[str, Any]:
    return {"id": f"{set_name}-{i:04d}", "domain": "adtech", "tags": ["bench"], "prompt": prompt,
            "reference": "mid", "rubric": {"pass_mark": 0.75, "criteria": [
                {"type": "choice", "name": "bucket", "labels": ["low", "mid", "high"], "weight": 3},
                {"type": "length", "name": "one_word", "max_words": 2, "weight": 1}]}}


def phase_raw_llm(model: Path, texts: list[str], max_tokens: int) -> float:
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model), max_model_len=256, enforce_eager=True, dtype="float32")
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    conversations: Any = [[{"role": "user", "content": t}] for t in texts]
    started = time.perf_counter()
    llm.chat(conversations, params, use_tqdm=False)
    return time.perf_counter() - started


def phase_raw_async(model: Path, texts: list[str], max_tokens: int) -> float:
    import anyio

    from modelsmith.gpu.engine import Sampling
    from modelsmith.gpu.vllm_engine import VllmEngine

    elapsed = 0.0

    async def go() -> None:
        nonlocal elapsed
        engine = VllmEngine("bench", model, max_model_len=256, max_lora_rank=8, max_loras=1, dtype="float32")
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            await engine.wait_ready(timeout=600)
            sampling = Sampling(temperature=0.0, max_tokens=max_tokens)
            started = time.perf_counter()
            async for _ in engine.generate_many([[{"role": "user", "content": t}] for t in texts], sampling):
                pass
            elapsed = time.perf_counter() - started
            tg.cancel_scope.cancel()

    anyio.run(go)
    return elapsed


def phase_daemon(model: Path, texts: list[str], max_tokens: int, scratch: Path) -> float:
    from modelsmith.examples import rtb_pricing
    from modelsmith.rpc.client import RpcClient
    from modelsmith.rpc.schema.jobs import JOB_EVENT, JobEvent

    home = scratch / "home"
    root = rtb_pricing.write_cluster(home, model)
    toml = root / "cluster.toml"
    toml.write_text(toml.read_text().replace("max_tokens = 4", f"max_tokens = {max_tokens}")
                    .replace("max_model_len = 256", "max_model_len = 256\ndtype = \"float32\""))
    held = max(1, len(texts) // 16)
    for set_name, chunk in (("core", texts[held:]), ("held-out", texts[:held])):
        data = {"scenarios": [scenario(i, t, set_name) for i, t in enumerate(chunk)]}
        (root / "scenarios" / set_name / "bids.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    sock = scratch / "s.sock"
    with open(scratch / "daemon.log", "wb") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "modelsmith.daemon", "--home", str(home), "--socket", str(sock)],
                                  stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **ENV})
    try:
        # Warm-up eval: waits for the engine to load, so that load is not measured.
        for tag in ("warmup", "measured"):
            deadline = time.monotonic() + 600
            while True:
                try:
                    with RpcClient(sock, timeout=5) as rpc:
                        rpc.call("daemon.ping")
                    break
                except Exception:
                    if time.monotonic() > deadline or daemon.poll() is not None:
                        raise SystemExit("the daemon did not come up") from None
                    time.sleep(0.2)  # a benchmark, not a test
            started = time.perf_counter()
            with RpcClient(sock, timeout=900) as rpc:
                job: dict[str, Any] = rpc.call("eval.run", {"cluster": rtb_pricing.CLUSTER, "tag": tag})
                rpc.call("job.watch", {"job_id": job["jobId"], "cursor": 0})
                for notice in rpc.notifications():
                    if notice.method == JOB_EVENT:
                        event = notice.decode(JobEvent)
                        if event.kind == "state" and event.data.get("state") in {"succeeded", "failed", "cancelled"}:
                            break
            elapsed = time.perf_counter() - started
        return elapsed
    finally:
        daemon.terminate()
        daemon.wait(timeout=120)


def run_phase(phase: str, model: Path, n: int, max_tokens: int) -> float:
    """One phase in its own process group; the whole group (engine core included) is killed after."""
    process = subprocess.Popen([sys.executable, __file__, "--phase", phase, "--model", str(model),
                                "--prompts", str(n), "--max-tokens", str(max_tokens)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={**os.environ, **ENV}, start_new_session=True)
    try:
        assert process.stdout is not None
        for line in process.stdout:  # the phase prints one JSON line when it has measured
            if line.startswith("{"):
                return float(json.loads(line)["seconds"])
        raise SystemExit(f"phase {phase} ended without a measurement (exit {process.wait()})")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--phase", choices=["raw-llm", "raw-async", "daemon"])
    parser.add_argument("--model")
    args = parser.parse_args()
    texts = prompts(args.prompts)
    if args.phase:
        model = Path(args.model)
        with tempfile.TemporaryDirectory(prefix="ms-eval-bench-") as scratch:
            if args.phase == "raw-llm":
                seconds = phase_raw_llm(model, texts, args.max_tokens)
            elif args.phase == "raw-async":
                seconds = phase_raw_async(model, texts, args.max_tokens)
            else:
                seconds = phase_daemon(model, texts, args.max_tokens, Path(scratch))
        print(json.dumps({"seconds": seconds}), flush=True)
        # vLLM's offline LLM has no shutdown call and its engine core keeps this process from
        # exiting; the measurement is printed, so leave at once (the parent's timeout is a bound).
        os._exit(0)
    from modelsmith.examples import rtb_pricing
    from modelsmith.examples.tinymodel import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="ms-eval-model-") as scratch:
        model = build_tiny_model(Path(scratch) / "model", [*rtb_pricing.corpus(), *texts],
                                 hidden_size=512, num_layers=6, num_heads=8)
        times: dict[str, float] = {}
        for phase in ("raw-llm", "raw-async", "daemon"):
            times[phase] = run_phase(phase, model, args.prompts, args.max_tokens)
    raw = times["raw-llm"]
    print(f"prompts x max tokens     {args.prompts} x {args.max_tokens} (greedy)")
    print(f"raw LLM.chat (offline)   {raw:.2f} s")
    print(f"raw AsyncLLM             {times['raw-async']:.2f} s   {times['raw-async'] / raw:.2f}x raw")
    print(f"modelsmith eval (daemon) {times['daemon']:.2f} s   {times['daemon'] / raw:.2f}x raw "
          f"({times['daemon'] / times['raw-async']:.2f}x AsyncLLM; target <= 1.10x raw)")


if __name__ == "__main__":
    main()
