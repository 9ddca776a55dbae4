"""Round-trip latency of ``daemon.ping`` over the daemon's Unix socket, next to a raw echo server.

    .venv/bin/python bench/rpc_roundtrip.py [--calls 20000] [--clients 16]

Starts a real daemon subprocess (``--no-engines``, temporary home) and, in the same run, a
minimal asyncio echo server in its own process that speaks the same framing (4-byte big-endian
length + a small JSON message) and sends each frame straight back. Then measures:

- one client: the blocking ``RpcClient`` against the daemon, a blocking raw socket against the
  echo server (like for like: same framing, same request bytes, no JSON-RPC work);
- ``--clients`` concurrent clients, one connection each, sequential calls per connection: the
  async client (``modelsmith.rpc.client.connect``) against the daemon, raw asyncio streams against
  the echo server.

Prints p50/p99 per call and the ratios. Targets: daemon p50 <= 3x the raw echo's, p99 < 1 ms
(single client). It also prints the server process's CPU time per call (from /proc), which
background load on the machine disturbs far less than wall-clock latency. It prints; it never
asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.daemon_process import short_tmp_dir, start_daemon  # noqa: E402

from modelsmith.rpc.client import RpcClient, connect  # noqa: E402

HEADER = struct.Struct(">I")
REQUEST = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "daemon.ping", "params": {}}).encode()

ECHO_SERVER = """\
import asyncio, os, struct, sys
HEADER = struct.Struct(">I")

async def echo(reader, writer):
    try:
        while True:
            header = await reader.readexactly(4)
            body = await reader.readexactly(HEADER.unpack(header)[0])
            writer.write(header + body)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()

async def main(path):
    server = await asyncio.start_unix_server(echo, path)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main(sys.argv[1]))
"""


@dataclass
class Result:
    name: str
    latencies_ns: list[int]
    wall_s: float
    server_cpu_s: float = 0.0

    @property
    def server_cpu_us(self) -> float:
        return self.server_cpu_s / self.calls * 1e6

    @property
    def calls(self) -> int:
        return len(self.latencies_ns)

    def percentile_us(self, q: float) -> float:
        ordered = sorted(self.latencies_ns)
        return ordered[min(int(q * len(ordered)), len(ordered) - 1)] / 1000

    @property
    def p50_us(self) -> float:
        return statistics.median(self.latencies_ns) / 1000

    @property
    def rate(self) -> float:
        return self.calls / self.wall_s


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def with_server_cpu(pid: int, run: Callable[[], Result]) -> Result:
    before = cpu_seconds(pid)
    result = run()
    result.server_cpu_s = cpu_seconds(pid) - before
    return result


@contextlib.contextmanager
def echo_server(path: Path) -> Iterator[int]:
    process = subprocess.Popen(
        [sys.executable, "-c", ECHO_SERVER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        if process.stdout.readline().strip() != "ready":
            raise RuntimeError("the echo server did not start")
        yield process.pid
    finally:
        process.terminate()
        process.wait(timeout=10)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return bytes(data)


def bench_blocking_echo(path: Path, calls: int, warmup: int) -> Result:
    frame = HEADER.pack(len(REQUEST)) + REQUEST
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        for _ in range(warmup):
            sock.sendall(frame)
            recv_exactly(sock, HEADER.unpack(recv_exactly(sock, 4))[0])
        latencies = []
        start = time.perf_counter()
        for _ in range(calls):
            t0 = time.perf_counter_ns()
            sock.sendall(frame)
            recv_exactly(sock, HEADER.unpack(recv_exactly(sock, 4))[0])
            latencies.append(time.perf_counter_ns() - t0)
        wall = time.perf_counter() - start
    return Result("raw echo, blocking socket", latencies, wall)


def bench_blocking_daemon(path: Path, calls: int, warmup: int) -> Result:
    with RpcClient(path, timeout=30) as rpc:
        for _ in range(warmup):
            rpc.call("daemon.ping")
        latencies = []
        start = time.perf_counter()
        for _ in range(calls):
            t0 = time.perf_counter_ns()
            rpc.call("daemon.ping")
            latencies.append(time.perf_counter_ns() - t0)
        wall = time.perf_counter() - start
    return Result("daemon.ping, RpcClient", latencies, wall)


async def _concurrent_echo(path: Path, clients: int, per_client: int, warmup: int) -> Result:
    frame = HEADER.pack(len(REQUEST)) + REQUEST
    latencies: list[int] = []

    async def one() -> None:
        reader, writer = await asyncio.open_unix_connection(str(path))
        try:
            for i in range(warmup + per_client):
                t0 = time.perf_counter_ns()
                writer.write(frame)
                header = await reader.readexactly(4)
                await reader.readexactly(HEADER.unpack(header)[0])
                if i >= warmup:
                    latencies.append(time.perf_counter_ns() - t0)
        finally:
            writer.close()

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(clients):
            tg.start_soon(one)
    return Result(f"raw echo, {clients} asyncio clients", latencies, time.perf_counter() - start)


async def _concurrent_daemon(path: Path, clients: int, per_client: int, warmup: int) -> Result:
    latencies: list[int] = []

    async def one() -> None:
        async with connect(path) as rpc:
            for i in range(warmup + per_client):
                t0 = time.perf_counter_ns()
                await rpc.call("daemon.ping")
                if i >= warmup:
                    latencies.append(time.perf_counter_ns() - t0)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(clients):
            tg.start_soon(one)
    return Result(f"daemon.ping, {clients} async clients", latencies, time.perf_counter() - start)


def print_table(results: list[Result]) -> None:
    print(f"{'case':<36} {'calls':>7} {'p50 us':>9} {'p99 us':>9} {'calls/s':>10} {'server CPU us/call':>19}")
    for r in results:
        print(
            f"{r.name:<36} {r.calls:>7} {r.p50_us:>9.1f} {r.percentile_us(0.99):>9.1f} {r.rate:>10.0f} "
            f"{r.server_cpu_us:>19.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=20_000, help="measured calls per case")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--warmup", type=int, default=500, help="unmeasured calls first")
    args = parser.parse_args()
    per_client = max(args.calls // args.clients, 1)

    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M:%S')}")
    with short_tmp_dir("msbench-") as base, start_daemon(
        Path(tempfile.mkdtemp(prefix="home-", dir=base)), socket_path=base / "run" / "ms.sock"
    ) as daemon, echo_server(base / "echo.sock") as echo_pid:
        echo_path = base / "echo.sock"
        warm = args.warmup // args.clients
        single = [
            with_server_cpu(echo_pid, lambda: bench_blocking_echo(echo_path, args.calls, args.warmup)),
            with_server_cpu(
                daemon.pid, lambda: bench_blocking_daemon(daemon.socket_path, args.calls, args.warmup)
            ),
        ]
        concurrent = [
            with_server_cpu(
                echo_pid,
                lambda: anyio.run(_concurrent_echo, echo_path, args.clients, per_client, warm),
            ),
            with_server_cpu(
                daemon.pid,
                lambda: anyio.run(_concurrent_daemon, daemon.socket_path, args.clients, per_client, warm),
            ),
        ]
    print()
    print_table(single + concurrent)
    print()
    for label, (echo, ours) in (("single client", single), (f"{args.clients} clients", concurrent)):
        print(
            f"{label:<14} p50 ratio daemon/echo {ours.p50_us / echo.p50_us:5.2f}x (target <= 3x)   "
            f"p99 ratio {ours.percentile_us(0.99) / echo.percentile_us(0.99):5.2f}x"
        )
    for label, (echo, ours) in (("single client", single), (f"{args.clients} clients", concurrent)):
        print(f"{label:<14} server CPU per call daemon/echo {ours.server_cpu_us / echo.server_cpu_us:5.2f}x")
    print(f"load average now: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    p99 = single[1].percentile_us(0.99)
    print(f"single-client daemon p99 {p99:.0f} us (target < 1000 us): {'met' if p99 < 1000 else 'MISSED'}")


if __name__ == "__main__":
    main()
