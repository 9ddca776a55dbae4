"""Judge agreement and the judge in the GRPO reward: the numbers of docs/judges.md.

    .venv/bin/python bench/judge_agreement.py [--examples 60] [--completions 256] [--no-vllm]

1. Agreement. A calibration set of ``--examples`` labelled answers (human scores 0..5, seeded)
   is judged by (a) a local HTTP judge that reads a noisy copy of the human score (each off by
   one point with probability 0.25, seeded: a judge about as good as a careful model), through a
   real OpenAIEngine, and (b) the tiny vLLM model (built locally) as the judge. Prints exact,
   within-one, kappa and Spearman with their intervals and the share answered, beside the
   baseline the issue quotes: published LLM judges agree with human raters about 80% of the time
   at best.
2. The reward. ``--completions`` distinct completions of a judge-only rubric are scored by the
   trainer's RewardScorer against the local HTTP judge (10 ms a reply, 16 in flight), once cold
   and once again (the cache), beside the same completions on a rubric without a judge.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import msgspec

from modelsmith.gpu.engine import Sampling
from modelsmith.gpu.openai_engine import OpenAIEngine
from modelsmith.gpu.trainer_reward import JudgeClients, RewardScorer
from modelsmith.gpu.trainer_spec import JudgeEndpoint
from modelsmith.loop.eval.judge_calibration import load_calibration
from modelsmith.loop.eval.judge_check import run_check
from modelsmith.loop.scoring.scenarios import Scenario

TEMPLATE = "Grade.\\nAnswer: <<{response}>>\\nReply SCORE: 0..{scale}"
PUBLISHED_AGREEMENT = 0.80


def serve(answer: Any, delay_s: float) -> tuple[ThreadingHTTPServer, str]:
    class Handler(BaseHTTPRequestHandler):
        def _reply(self, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._reply({"object": "list", "data": [{"id": "judge"}]})

        def do_POST(self) -> None:
            request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            time.sleep(delay_s)
            text = answer(str(request["messages"][-1]["content"]))
            self._reply({"choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": text}}],
                         "usage": {"prompt_tokens": 5, "completion_tokens": 2}})

        def log_message(self, format: str, *args: Any) -> None:
            pass

    ThreadingHTTPServer.request_queue_size = 128  # a burst of connects must not be dropped
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


def noisy_judge(prompt: str) -> str:
    token = prompt.split("<<", 1)[1].split(">>", 1)[0]  # "answer-<id>-<noisy score>"
    return f"SCORE: {token.rsplit('-', 1)[1]}"


def calibration(root: Path, examples: int, seed: int) -> Path:
    rng = random.Random(seed)
    lines = ["judge:", "  engine: grader", f'  template: "{TEMPLATE}"', "  scale: 5",
             "pass_mark: 0.6", "repeats: 3", "examples:"]
    for index in range(examples):
        human = rng.randint(0, 5)
        noisy = min(5, max(0, human + rng.choice((-1, 1)))) if rng.random() < 0.25 else human
        lines += [f"  - id: ex-{index:03d}", f"    prompt: question {index}",
                  f"    response: answer-{index}-{noisy}", f"    human_score: {human}",
                  "    labeller: bench"]
    path = root / "judges" / "grader.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def errors_of(rows: list[dict[str, Any]]) -> int:
    return sum(str(reply).startswith("error: ") for row in rows for reply in row["replies"])


def show(label: str, figures: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    def f(name: str) -> str:
        value, ci = figures.get(name), figures.get(name + "_ci95")
        if value is None:
            return "undefined"
        return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

    print(f"{label}: answered {figures['answered']}/{figures['examples']}, exact {f('exact_rate')}, "
          f"within one {f('within_one_rate')}, kappa {f('kappa')}, spearman {f('spearman')}, "
          f"mean spread {figures['consistency_mean_spread']}, failed verdicts "
          f"{figures['repeat_failures']} (engine errors {errors_of(rows)}); baseline: published judges agree "
          f"with people ~{PUBLISHED_AGREEMENT:.0%} at best")


async def agreement(args: argparse.Namespace, root: Path) -> None:
    cal = load_calibration(calibration(root, args.examples, args.seed), cluster_root=root)
    server, url = serve(noisy_judge, 0.0)
    engine = OpenAIEngine("grader", url, "judge")
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            await engine.wait_ready(10)
            figures, rows = await run_check(cal, engine, Sampling(temperature=0.0, max_tokens=16),
                                         repeats=3, resamples=2000, seed=0)
            tg.cancel_scope.cancel()
    finally:
        server.shutdown()
    show("HTTP judge (human score +-1 at p=0.25)", figures, rows)
    if args.no_vllm:
        return
    import os

    from modelsmith.examples import rtb_pricing
    from modelsmith.examples.tinymodel import build_tiny_model
    from modelsmith.gpu.vllm_engine import VllmEngine, cpu_engine_env

    os.environ.update(cpu_engine_env())
    model = build_tiny_model(root / "tiny", rtb_pricing.corpus())
    tiny = VllmEngine("tiny-judge", model, max_model_len=512)
    async with anyio.create_task_group() as tg:
        await tg.start(tiny.run)
        await tiny.wait_ready(600)
        figures, rows = await run_check(cal, tiny, Sampling(temperature=0.8, max_tokens=24, seed=0),
                                     repeats=3, resamples=2000, seed=0)
        tg.cancel_scope.cancel()
    show("tiny vLLM model as judge", figures, rows)


def reward(args: argparse.Namespace) -> None:
    base = {"id": "s", "set": "core", "domain": "d", "prompt": "p"}
    judged = msgspec.convert({**base, "rubric": {"criteria": [
        {"type": "llm_judge", "engine": "grader", "template": TEMPLATE, "scale": 5}]}}, Scenario)
    plain = msgspec.convert({**base, "rubric": {"criteria": [
        {"type": "contains", "value": "answer"}]}}, Scenario)
    completions = [f"answer-{i}-{i % 6}" for i in range(args.completions)]
    started = time.perf_counter()
    RewardScorer(["p"], [plain]).score_many(["p"] * len(completions), completions)
    rubric_s = time.perf_counter() - started
    server, url = serve(noisy_judge, 0.010)
    clients = JudgeClients({"grader": JudgeEndpoint(url=url, model="judge", max_concurrency=16)})
    try:
        clients.start(10)
        scorer = RewardScorer(["p"], [judged], clients)
        started = time.perf_counter()
        scorer.score_many(["p"] * len(completions), completions)
        cold_s = time.perf_counter() - started
        started = time.perf_counter()
        scorer.score_many(["p"] * len(completions), completions)
        cached_s = time.perf_counter() - started
    finally:
        clients.close()
        server.shutdown()
    n = len(completions)
    print(f"reward of {n} completions: rubric without a judge {rubric_s * 1000:.1f} ms "
          f"({rubric_s / n * 1e6:.0f} us each, the baseline); with the HTTP judge (10 ms a reply, "
          f"16 in flight) cold {cold_s * 1000:.0f} ms ({cold_s / n * 1000:.2f} ms each, floor "
          f"{0.010 / 16 * 1000:.2f}), cached {cached_s * 1000:.1f} ms; judge calls {clients.calls}, "
          f"cache hits {clients.cache_hits}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=60)
    parser.add_argument("--completions", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-vllm", action="store_true", help="skip the tiny vLLM judge")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        anyio.run(agreement, args, Path(tmp))
    reward(args)


if __name__ == "__main__":
    main()
