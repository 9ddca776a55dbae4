"""Start-up cost of the CLI: ``modelsmith status --json`` against a running daemon vs ``python -c pass``.

    .venv/bin/python bench/cli_start.py [--runs 20]

Starts a real daemon subprocess (``--no-engines``, a temporary home with one cluster), then
times whole processes, alternating the two commands so that background load hits both alike:
``python -m modelsmith.clients.cli status --json`` (a full round trip to the daemon included)
and ``python -c pass`` (the interpreter's own floor). Prints the medians and their ratio
(target: <= 4x). It prints; it never asserts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.daemon_process import short_tmp_dir, start_daemon, write_cluster  # noqa: E402


def wall_time(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="runs of each command")
    args = parser.parse_args()

    cli = [sys.executable, "-m", "modelsmith.clients.cli", "status", "--json"]
    floor = [sys.executable, "-c", "pass"]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M:%S')}")
    with short_tmp_dir("msbench-") as base:
        write_cluster(base / "home", "adtech")
        with start_daemon(base / "home", socket_path=base / "run" / "ms.sock") as daemon:
            env = {**os.environ, "MODELSMITH_SOCKET": str(daemon.socket_path)}
            for command in (cli, floor):  # warm the page cache and .pyc files
                wall_time(command, env)
            cli_times, floor_times = [], []
            for _ in range(args.runs):
                cli_times.append(wall_time(cli, env))
                floor_times.append(wall_time(floor, env))
    cli_ms = statistics.median(cli_times) * 1000
    floor_ms = statistics.median(floor_times) * 1000
    print()
    print(f"{'command':<40} {'runs':>5} {'median ms':>10} {'min ms':>8}")
    print(f"{'modelsmith status --json':<40} {args.runs:>5} {cli_ms:>10.1f} {min(cli_times) * 1000:>8.1f}")
    print(f"{'python -c pass':<40} {args.runs:>5} {floor_ms:>10.1f} {min(floor_times) * 1000:>8.1f}")
    print()
    print(f"ratio {cli_ms / floor_ms:.2f}x (target <= 4x)")


if __name__ == "__main__":
    main()
