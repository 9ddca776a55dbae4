"""Latency from a complete file landing in ``inbox/`` to its eval job starting (issue 6).

A real daemon with its vLLM engine on the tiny example model and cluster. Each drop is
written elsewhere and renamed into the inbox (complete at rename time); the clock stops when
``job.list`` shows the new eval job. The baseline, in the same run, is watchfiles' own raw
notification latency for the same kind of rename with the same debounce settings.

    .venv/bin/python bench/inbox_latency.py [--drops 10]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import anyio
import watchfiles

from modelsmith.examples import rtb_pricing
from modelsmith.examples.tinymodel import build_tiny_model
from modelsmith.loop.autonomy.inbox import DEBOUNCE_MS
from modelsmith.rpc.client import RpcClient

DROP = """scenarios:
  - id: drop-{n}
    set: core
    domain: adtech
    prompt: "premium video in region {n}. bucket?"
    reference: high
    rubric: {{criteria: [{{type: choice, labels: [low, mid, high]}}]}}
"""


def raw_watchfiles_latency(directory: Path, drops: int) -> list[float]:
    latencies: list[float] = []
    ready = threading.Event()
    seen = threading.Event()

    async def watch() -> None:
        ready.set()
        async for _ in watchfiles.awatch(directory, debounce=DEBOUNCE_MS, step=20, recursive=False):
            seen.set()
            if len(latencies) >= drops:
                return

    thread = threading.Thread(target=anyio.run, args=(watch,), daemon=True)
    thread.start()
    ready.wait()
    time.sleep(0.5)
    for n in range(drops):
        seen.clear()
        staging = directory.parent / f"raw-{n}.yaml"
        staging.write_text(DROP.format(n=n))
        start = time.perf_counter()
        os.rename(staging, directory / staging.name)
        seen.wait(10)
        latencies.append(time.perf_counter() - start)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--drops", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="msb-", dir="/tmp") as tmp:
        root = Path(tmp)
        home = root / "home"
        model = build_tiny_model(root / "model", rtb_pricing.corpus())
        cluster = rtb_pricing.write_cluster(home, model, core=8, held_out=4)
        raw_dir = root / "raw"
        raw_dir.mkdir()
        baseline = raw_watchfiles_latency(raw_dir, args.drops)
        sock = root / "ms.sock"
        notify = root / "notify.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener.bind(str(notify))
        listener.settimeout(300)
        env = {**os.environ, "NOTIFY_SOCKET": str(notify)}
        daemon = subprocess.Popen([sys.executable, "-m", "modelsmith.daemon", "--home", str(home),
                                   "--socket", str(sock)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while "READY=1" not in listener.recv(4096).decode():
                pass
            latencies: list[float] = []
            with RpcClient(sock) as rpc:
                for n in range(args.drops):
                    known = {j["job_id"] for j in rpc.call("job.list", {})["jobs"]}
                    staging = root / f"drop-{n}.yaml"
                    staging.write_text(DROP.format(n=n))
                    start = time.perf_counter()
                    os.rename(staging, cluster / "inbox" / staging.name)
                    while True:
                        jobs = rpc.call("job.list", {})["jobs"]
                        if any(j["kind"] == "eval" and j["job_id"] not in known for j in jobs):
                            break
                        if time.perf_counter() - start > 30:
                            raise SystemExit("no eval job started within 30 s")
                        time.sleep(0.005)
                    latencies.append(time.perf_counter() - start)
                    rpc.call("loop.stop", {"cluster": cluster.name})
        finally:
            daemon.terminate()
            daemon.wait(timeout=60)
    print(f"{'case':<52}{'p50':>9}{'max':>9}")
    print(f"{'watchfiles raw notification (baseline)':<52}{statistics.median(baseline) * 1000:>7.0f}ms"
          f"{max(baseline) * 1000:>7.0f}ms")
    print(f"{'drop complete -> eval job started (daemon)':<52}{statistics.median(latencies) * 1000:>7.0f}ms"
          f"{max(latencies) * 1000:>7.0f}ms")
    print(f"ratio p50: {statistics.median(latencies) / statistics.median(baseline):.2f}x; target: under 1 s")


if __name__ == "__main__":
    main()
