"""GRPO job overhead as the daemon runs it, and adapter hot-load latency.

    .venv/bin/python bench/train_overhead.py [--steps 200]

Builds the tiny model and the rtb-pricing cluster, starts a real daemon (engines on), runs a
quick base eval, then two GRPO jobs of ``--steps`` steps (plateau stop off), ``--gap`` seconds
apart: the first starts its trainer cold, the second gets the warm child (imports done) that was
started after the first. The last line gives job wall / time inside TRL steps for both. Prints the time
inside TRL's steps (sum of ``seconds_per_step`` over the metric events) against the whole job
wall time (train.start -> job end, which includes spawn, dataset, reward scoring, metric
streaming, adapter save, ledger and hot load), the ratio, and the job's ``hot_load_seconds``
(train end -> first answer from the new adapter in the warm engine).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from modelsmith.examples import rtb_pricing
from modelsmith.examples.tinymodel import build_tiny_model
from modelsmith.rpc.client import RpcClient
from modelsmith.rpc.schema.jobs import JOB_EVENT, JobEvent

FINISHED = {"succeeded", "failed", "cancelled"}


def wait_socket(socket_path: Path, daemon: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise SystemExit(f"the daemon exited {daemon.returncode}")
        try:
            with RpcClient(socket_path, timeout=5) as rpc:
                rpc.call("daemon.ping")
                return
        except Exception:
            time.sleep(0.2)  # a benchmark, not a test: polling the socket is fine here
    raise SystemExit("the daemon did not come up")


def follow(socket_path: Path, job_id: str, timeout: float = 1800.0) -> tuple[list[JobEvent], dict[str, Any], float]:
    """Every event of the job and its final record; the last float is the end time (monotonic)."""
    events: list[JobEvent] = []
    with RpcClient(socket_path, timeout=timeout) as rpc:
        rpc.call("job.watch", {"job_id": job_id, "cursor": 0})
        for notice in rpc.notifications():
            if notice.method != JOB_EVENT:
                continue
            event = notice.decode(JobEvent)
            events.append(event)
            if event.kind == "state" and event.data.get("state") in FINISHED:
                break
        ended = time.monotonic()
        job: dict[str, Any] = rpc.call("job.get", {"job_id": job_id})
    return events, job, ended


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--gap", type=float, default=15.0, help="seconds between the two jobs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ms-bench-") as scratch:
        root = Path(scratch)
        model = build_tiny_model(root / "model", rtb_pricing.corpus())
        home = root / "home"
        cluster = rtb_pricing.write_cluster(home, model, max_steps=args.steps)
        toml = cluster / "cluster.toml"
        # Run every step: the plateau stop would end the job early and change what is measured.
        toml.write_text(re.sub(r"(?m)^min_steps = \d+$", f"min_steps = {args.steps}", toml.read_text()))
        socket_path = root / "s.sock"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
        with open(root / "daemon.log", "wb") as log:
            daemon = subprocess.Popen([sys.executable, "-m", "modelsmith.daemon", "--home", str(home),
                                       "--socket", str(socket_path)], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_socket(socket_path, daemon)
            with RpcClient(socket_path) as rpc:
                started: dict[str, Any] = rpc.call("eval.run", {"cluster": rtb_pricing.CLUSTER, "tag": "base", "quick": True})
            follow(socket_path, started["jobId"])
            runs = []
            for _ in ("cold", "warm"):
                began = time.monotonic()
                with RpcClient(socket_path) as rpc:
                    train: dict[str, Any] = rpc.call("train.start", {"cluster": rtb_pricing.CLUSTER, "eval_tag": "base",
                                                     "follow_up_eval": False})
                events, job, ended = follow(socket_path, train["jobId"])
                runs.append((events, job, ended - began))
                time.sleep(args.gap)  # the time between jobs, in which the next warm child imports
        finally:
            daemon.terminate()
            daemon.wait(timeout=120)
    ratios = []
    for label, (events, job, wall) in zip(("cold start", "warm child"), runs, strict=True):
        if job["state"] != "succeeded":
            raise SystemExit(f"the job ended {job['state']}: {job.get('error')}")
        metrics = [e.data for e in events if e.kind == "metric"]
        inside = sum(m.get("seconds_per_step") or 0.0 for m in metrics)
        result = job["result"]
        ratios.append(wall / inside)
        print(f"[{label}]")
        print(f"steps                  {result['steps']} ({len(metrics)} metric events)")
        print(f"inside TRL steps       {inside:.2f} s")
        print(f"job wall time          {wall:.2f} s  (train.start -> job end, incl. hot load)")
        print(f"overhead               {wall - inside:.2f} s  = {(wall - inside) / wall:.1%} of the job")
        print(f"hot-load latency       {result.get('hot_load_seconds')} s  (train end -> first answer from the adapter)")
    print(f"job wall / inside TRL steps: cold {ratios[0]:.2f}, warm {ratios[1]:.2f} (target <= 1.10)")


if __name__ == "__main__":
    main()
