"""Daemon restart -> READY=1 with N clusters and long ledgers (issue 6).

Prints the time from spawning the daemon to its READY=1 notification for 10 clusters with
10,000 ledger entries each, next to the same daemon with 10 clusters and empty ledgers (the
baseline: process start, imports, socket). Engines are off (``--no-engines``): this measures
verifying ledgers and loading scenario sets, not vLLM.

    .venv/bin/python bench/restart_ready.py [--clusters 10] [--entries 10000] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from modelsmith.examples import rtb_pricing
from modelsmith.loop.records.ledger import Ledger


def make_home(root: Path, clusters: int, entries: int, model_dir: Path) -> Path:
    home = root / f"home-{entries}"
    template_ledger = root / f"ledger-{entries}.jsonl"
    if entries and not template_ledger.exists():
        ledger = Ledger.open(template_ledger)
        for i in range(entries):
            ledger.append("bench.event", {"i": i, "note": "x" * 40})
    for c in range(clusters):
        cluster = rtb_pricing.write_cluster(home, model_dir)
        target = cluster.rename(home / f"c{c:02d}")
        if entries:
            shutil.copy(template_ledger, target / "ledger.jsonl")
    return home


def time_to_ready(home: Path, scratch: Path) -> float:
    notify_path = scratch / "notify.sock"
    notify_path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(120)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "modelsmith.daemon", "--home", str(home), "--socket", str(scratch / "ms.sock"),
         "--no-engines"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            message = listener.recv(4096).decode()
            if "READY=1" in message:
                return time.perf_counter() - start
    finally:
        process.terminate()
        process.wait(timeout=60)
        listener.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clusters", type=int, default=10)
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="msb-", dir="/tmp") as tmp:
        root = Path(tmp)
        model_dir = root / "model"  # never loaded: engines are off
        t0 = time.perf_counter()
        long_home = make_home(root, args.clusters, args.entries, model_dir)
        empty_home = make_home(root, args.clusters, 0, model_dir)
        print(f"built {args.clusters} clusters x {args.entries} ledger entries in {time.perf_counter() - t0:.1f} s")
        # The first start writes each cluster's scenarios.changed entry; measure restarts after it.
        time_to_ready(long_home, root)
        time_to_ready(empty_home, root)
        long_runs = [time_to_ready(long_home, root) for _ in range(args.runs)]
        empty_runs = [time_to_ready(empty_home, root) for _ in range(args.runs)]
    long_median, empty_median = statistics.median(long_runs), statistics.median(empty_runs)
    print(f"{'case':<44}{'median to READY':>16}")
    print(f"{f'{args.clusters} clusters, empty ledgers (baseline)':<44}{empty_median:>15.3f}s")
    print(f"{f'{args.clusters} clusters x {args.entries} entries':<44}{long_median:>15.3f}s")
    print(f"ratio: {long_median / empty_median:.2f}x; ledger verification costs "
          f"{(long_median - empty_median) * 1000:.0f} ms for {args.clusters * args.entries} entries")


if __name__ == "__main__":
    main()
