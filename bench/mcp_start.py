"""How fast `modelsmith mcp` starts, and what a tool call adds over the same RPC from the CLI path.

Run:  .venv/bin/python bench/mcp_start.py [--starts 10] [--calls 200]

Prints (never asserts):
  1. ``python -c "import mcp.server"``: the SDK import alone (median of N fresh processes);
  2. spawn of ``python -m modelsmith.clients.cli mcp`` -> the answer to the first tools/list
     (initialize + initialized + tools/list written at once; median of N, target < 1.5 s);
  3. p50/p90 of ``modelsmith_fleet_status`` over MCP stdio vs ``RpcClient.call("fleet.status")``
     (the blocking client the CLI uses, one connection per call as the CLI makes it) against
     the same real daemon, and the difference: the latency MCP adds.

The daemon is a real subprocess without engines on a temporary home with one cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.daemon_process import (  # noqa: E402
    GOOD_CLUSTER_TOML,
    short_tmp_dir,
    start_daemon,
    write_cluster,
)

from modelsmith.rpc.client import RpcClient  # noqa: E402

HANDSHAKE = "".join(json.dumps(m) + "\n" for m in (
    {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "bench", "version": "1"}}},
    {"jsonrpc": "2.0", "method": "notifications/initialized"},
    {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
)).encode()


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def time_sdk_import(n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import mcp.server"], check=True, cwd=ROOT)
        out.append(time.perf_counter() - start)
    return out


def time_first_tools_list(socket_path: Path, n: int) -> list[float]:
    out = []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(n):
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "modelsmith.clients.cli", "mcp", "--socket", str(socket_path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT, env=env)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(HANDSHAKE)
        proc.stdin.flush()
        while True:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError("the MCP server exited before answering tools/list")
            if json.loads(line).get("id") == 2:
                break
        out.append(time.perf_counter() - start)
        proc.stdin.close()
        proc.wait(timeout=30)
    return out


def time_rpc_calls(socket_path: Path, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        with RpcClient(socket_path, timeout=30) as rpc:
            rpc.call("fleet.status", {})
        out.append(time.perf_counter() - start)
    return out


async def time_mcp_calls(socket_path: Path, n: int) -> list[float]:
    from mcp.client import Client
    from mcp.client.stdio import StdioServerParameters

    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "modelsmith.clients.cli", "mcp", "--socket", str(socket_path)],
        env={"PYTHONPATH": str(ROOT)}, cwd=ROOT)
    out = []
    with anyio.fail_after(600):
        async with Client(params) as client:
            await client.list_tools()
            for _ in range(n):
                start = time.perf_counter()
                result = await client.call_tool("modelsmith_fleet_status", {})
                out.append(time.perf_counter() - start)
                assert not result.is_error, result.structured_content
    return out


def ms(value: float) -> str:
    return f"{value * 1000:8.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=10)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    with short_tmp_dir() as base:
        home = base / "home"
        write_cluster(home, "adtech", GOOD_CLUSTER_TOML)
        with start_daemon(home, socket_path=base / "run" / "ms.sock") as daemon:
            sock = daemon.socket_path
            # Interleaved, so that both see the same background load on a shared machine.
            imports: list[float] = []
            starts: list[float] = []
            for _ in range(args.starts):
                imports += time_sdk_import(1)
                starts += time_first_tools_list(sock, 1)
            rpc = time_rpc_calls(sock, args.calls)
            mcp = anyio.run(time_mcp_calls, sock, args.calls)
    print(f"python -c 'import mcp.server'            median {ms(statistics.median(imports))}  (n={args.starts})")
    print(f"spawn `modelsmith mcp` -> first tools/list median {ms(statistics.median(starts))}"
          f"  min {ms(min(starts))}  max {ms(max(starts))}  (n={args.starts}; target < 1500 ms)")
    print(f"fleet.status via RpcClient.call (CLI path)  p50 {ms(quantile(rpc, 0.5))}  p90 {ms(quantile(rpc, 0.9))}  (n={args.calls})")
    print(f"modelsmith_fleet_status via MCP stdio       p50 {ms(quantile(mcp, 0.5))}  p90 {ms(quantile(mcp, 0.9))}  (n={args.calls})")
    print(f"added by MCP (p50 difference)               {ms(quantile(mcp, 0.5) - quantile(rpc, 0.5))}")


if __name__ == "__main__":
    main()
