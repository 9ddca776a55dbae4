"""Does training on synthetic scenarios change the result? One controlled pair on rtb-pricing.

    .venv/bin/python bench/synth_effect.py [--max-steps 30] [--count 12] [--cache-dir DIR]

The demo's base model (cached like ``make demo``'s), the demo's cluster, one real daemon with its
vLLM engine. After the baseline eval, one synth step with the cluster's generator
(``--count`` per failure pattern), then two trainings from the base model with the same seed and
steps: **A** ``--target failures`` (the baseline's core failures) and **B**
``--target failures+synthetic`` (the same failures and the synthetic scenarios of their
patterns). Each is followed by its full eval (core + held-out; the synthetic set is never in
it). Prints composite and held-out (with 95% intervals) of baseline, A and B, and the paired
test of B against A. One seed: a difference inside the intervals is no evidence either way. It
prints; it never asserts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modelsmith.examples import rtb_pricing  # noqa: E402
from modelsmith.examples.demo import (  # noqa: E402
    DEMO_CORE,
    DEMO_HELD_OUT,
    DEMO_LORA_RANK,
    DemoDaemon,
    prepare_model,
)
from modelsmith.rpc.client import RpcClient  # noqa: E402

CLUSTER = rtb_pricing.CLUSTER
JOB_TIMEOUT_S = 1800.0


def call(socket: Path, method: str, params: dict[str, Any]) -> Any:
    with RpcClient(socket, timeout=120.0) as client:
        return client.call(method, params)


def wait(socket: Path, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        job: dict[str, Any] = call(socket, "job.get", {"job_id": job_id})
        job = job.get("job", job)
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} did not end")
        time.sleep(1.0)


def train(socket: Path, target: str, max_steps: int) -> str:
    started = call(socket, "train.start", {"cluster": CLUSTER, "eval_tag": "baseline",
                                           "target": target, "init": "base",
                                           "overrides": {"max_steps": max_steps}})
    job = wait(socket, started["jobId"])
    status = call(socket, "train.status", {"job_id": job["job_id"]})
    follow = status["follow_up_eval"]
    if job["state"] != "succeeded" or not follow:
        raise RuntimeError(f"training ({target}) {job['state']}: {job.get('error')}")
    wait(socket, follow["job_id"])
    metrics = status["metrics"]
    rewards = [m["reward_mean"] for m in metrics if m.get("reward_mean") is not None]
    print(f"  {target}: {started['scenarios']} training scenarios, adapter {status['adapter']}, "
          f"{len(metrics)} steps logged, stop {status['stop_reason']}, reward "
          f"{rewards[0] if rewards else None} -> {rewards[-1] if rewards else None}, "
          f"eval {follow['tag']}", flush=True)
    return str(follow["tag"])


def line(name: str, summary: dict[str, Any]) -> str:
    def figure(value: float | None, ci: list[float] | None) -> str:
        if value is None:
            return "—"
        return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
    return (f"{name:<34} adapter {summary.get('adapter') or 'base':<7} composite {figure(summary['composite'], summary.get('composite_ci95'))}"
            f"   held-out {figure(summary['held_out'], summary.get('held_out_ci95'))}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--count", type=int, default=12)
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".cache" / "modelsmith-demo")
    args = parser.parse_args()
    model = prepare_model(args.cache_dir)
    with tempfile.TemporaryDirectory(prefix="ms-synth-effect-") as tmp:
        home = Path(tmp) / "home"
        rtb_pricing.write_cluster(home, model, core=DEMO_CORE, held_out=DEMO_HELD_OUT,
                                  lora_rank=DEMO_LORA_RANK)
        socket = Path(tempfile.mkdtemp(prefix="ms-se-", dir="/tmp")) / "modelsmith.sock"
        with DemoDaemon(home, socket) as daemon:
            daemon.wait_ready()
            wait(socket, call(socket, "eval.run", {"cluster": CLUSTER, "tag": "baseline"})["jobId"])
            synth = wait(socket, call(socket, "synth.run", {"cluster": CLUSTER,
                                                            "from_eval": "baseline",
                                                            "count": args.count})["jobId"])
            print(f"synth step: {synth['result']['counts']}", flush=True)
            tag_a = train(socket, "failures", args.max_steps)
            tag_b = train(socket, "failures+synthetic", args.max_steps)
            summaries = {tag: call(socket, "eval.summary", {"cluster": CLUSTER, "tag": tag})
                         for tag in ("baseline", tag_a, tag_b)}
            compare = call(socket, "eval.compare", {"cluster": CLUSTER, "a": tag_a, "b": tag_b})
            daemon.stop()
        print(f"\nrtb-pricing, {args.max_steps} GRPO steps each, seed 0, from the base model:")
        print(line("baseline (base model)", summaries["baseline"]))
        print(line("A  --target failures", summaries[tag_a]))
        print(line("B  --target failures+synthetic", summaries[tag_b]))
        paired = compare.get("paired") or {}
        print(f"B vs A: composite delta {compare['composite_delta']:+.3f}, fixed "
              f"{compare['fixed']}, regressed {compare['regressed']}; McNemar p="
              f"{paired.get('mcnemar_p', float('nan')):.3f}")


if __name__ == "__main__":
    main()
