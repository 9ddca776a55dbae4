"""Named-engine overhead: prompts through a named OpenAI-compatible engine vs raw HTTP.

    .venv/bin/python bench/named_engine_overhead.py [--prompts 512] [--concurrency 32]

Builds the tiny model locally (no hub), starts a real ``vllm serve`` of it (the OpenAI server
module, as tests/gpu/test_openai_engine.py does), then in the same run sends the same prompts
(greedy, so both sides ask the server for the same work) ``--rounds`` times each way,
alternating: as raw concurrent httpx requests (at most ``--concurrency`` in flight) and through
``NamedEngines.get(...).generate_many`` of an ``[engines.NAME] kind = "openai"`` section with
``max_concurrency = --concurrency``. Prints each pass, the best of each side and the ratio
named / raw (target <= 1.10x).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx

from modelsmith.daemon.config import load_daemon_config
from modelsmith.examples.tinymodel import build_tiny_model
from modelsmith.gpu.engine import Sampling
from modelsmith.gpu.named_engines import NamedEngines
from modelsmith.gpu.vllm_engine import cpu_engine_env

CORPUS = (
    "What is the click-through rate of a campaign with 40 clicks and 2000 impressions? 0.02",
    "The bid floor for the premium display inventory is 1.25 USD CPM.",
    "Budget pacing spreads a daily budget of 500 USD evenly across 24 hours.",
    "Conversion rate equals conversions divided by clicks.",
    "Effective CPM is revenue divided by impressions times 1000.",
)
SERVED = "tiny"


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(model_dir: Path, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--host", "127.0.0.1", "--port", str(port), "--served-model-name", SERVED,
        "--max-model-len", "512", "--enforce-eager", "--seed", "0", "--disable-log-stats",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=cpu_engine_env(), stdout=log,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"vllm serve exited {process.returncode}:\n"
                             + log_path.read_text(errors="replace")[-3000:])
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)  # a benchmark polling another process's readiness
    process.terminate()
    raise SystemExit("vllm serve not ready in 600 s")


async def raw_pass(url: str, prompts: list[str], sampling: Sampling, concurrency: int) -> float:
    limiter = anyio.CapacityLimiter(concurrency)
    async with httpx.AsyncClient(base_url=f"{url}/v1", timeout=300,
                                 limits=httpx.Limits(max_connections=concurrency + 2)) as client:

        async def one(prompt: str) -> None:
            body: dict[str, Any] = {
                "model": SERVED, "messages": [{"role": "user", "content": prompt}],
                "temperature": sampling.temperature, "top_p": sampling.top_p,
                "max_tokens": sampling.max_tokens,
            }
            async with limiter:
                response = await client.post("/chat/completions", json=body)
            response.raise_for_status()
            response.json()["choices"][0]["message"]["content"]

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for prompt in prompts:
                tg.start_soon(one, prompt)
        return time.perf_counter() - started


async def named_pass(named: NamedEngines, prompts: list[str], sampling: Sampling) -> float:
    engine = named.get("served")
    started = time.perf_counter()
    count = 0
    async for _ in engine.generate_many(prompts, sampling):
        count += 1
    elapsed = time.perf_counter() - started
    assert count == len(prompts)
    return elapsed


async def measure(url: str, home: Path, args: argparse.Namespace) -> None:
    (home / "modelsmith.toml").write_text(
        f'[engines.served]\nkind = "openai"\nurl = "{url}/v1"\nmodel = "{SERVED}"\n'
        f"max_concurrency = {args.concurrency}\n")
    named = NamedEngines.from_config(load_daemon_config(None, home), home=home)
    sampling = Sampling(temperature=0.0, max_tokens=args.max_tokens)
    prompts = [f"Campaign {n}: {CORPUS[n % len(CORPUS)]} What is the CPM?"
               for n in range(args.prompts)]
    raw_times: list[float] = []
    named_times: list[float] = []
    async with anyio.create_task_group() as tg:
        await tg.start(named.run)
        await named.get("served").wait_ready(timeout=60)
        await raw_pass(url, prompts[:64], sampling, args.concurrency)  # warm-up, not counted
        await named_pass(named, prompts[:64], sampling)
        for round_ in range(args.rounds):
            raw_times.append(await raw_pass(url, prompts, sampling, args.concurrency))
            named_times.append(await named_pass(named, prompts, sampling))
            print(f"round {round_ + 1}: raw httpx {raw_times[-1]:.2f} s, "
                  f"named engine {named_times[-1]:.2f} s", flush=True)
        tg.cancel_scope.cancel()
    raw, via_named = min(raw_times), min(named_times)
    print(f"{args.prompts} prompts, max_tokens {args.max_tokens}, concurrency "
          f"{args.concurrency}: raw httpx {raw:.2f} s, named engine {via_named:.2f} s, "
          f"ratio {via_named / raw:.3f}x (target <= 1.10x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ms-named-bench-") as tmp:
        root = Path(tmp)
        model_dir = build_tiny_model(root / "model", CORPUS * 8)
        process, url = start_server(model_dir, root / "serve.log")
        try:
            anyio.run(measure, url, root, args)
        finally:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)


if __name__ == "__main__":
    main()
