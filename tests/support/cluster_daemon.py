"""One real daemon WITH a warm vLLM engine per test session, on a home of rtb-pricing clusters.

Starting the engine is the expensive part (15-60 s on two busy cores), so every test that needs
a daemon with an engine shares :func:`cluster_daemon` (session scope). Tests that need state of
their own (an iteration, a ledger, a baseline eval) take a cluster of their own from
:data:`SESSION_CLUSTERS`: every cluster is a copy of the bundled ``rtb-pricing`` example on the
same tiny model, so they all share one engine. tests/conftest.py registers this module as a
plugin for the whole session, so a test just asks for the fixture::

    @pytest.mark.vllm
    def test_something(cluster_daemon: ClusterDaemon) -> None:
        started = cluster_daemon.call("eval.run", {"cluster": "rtb-pricing", "quick": True})
        job = cluster_daemon.wait_job(started["jobId"])

Every wait is bounded; nothing sleeps to wait for readiness (jobs are followed with
``job.watch`` notifications, and evals wait for the engine inside the daemon).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

from modelsmith.examples import rtb_pricing
from modelsmith.examples.tinymodel import build_tiny_model
from modelsmith.rpc.client import RpcClient
from modelsmith.rpc.schema.jobs import JOB_EVENT, JobEvent
from support.daemon_process import DaemonProcess, start_daemon

# Engine start on a busy 2-core machine; an eval waits for the engine inside the daemon.
JOB_TIMEOUT_S = 300.0
FINISHED_STATES = frozenset({"succeeded", "failed", "cancelled"})

# Cluster name -> keyword arguments for rtb_pricing.write_cluster. Each test module uses its own.
SESSION_CLUSTERS: dict[str, dict[str, Any]] = {
    # The example as shipped: a random tiny model fails its gates (eval exits 1).
    rtb_pricing.CLUSTER: {"max_steps": 10},
    # Thresholds 0 and a lenient regression policy: every eval passes (eval exits 0).
    "rtb-pass": {"composite": 0.0, "held_out_threshold": 0.0, "max_regressions": 1000},
    # Eval tests that need a fresh ledger (baselines and regressions).
    "rtb-evals": {"max_steps": 10},
    # A short GRPO run followed by the automatic follow-up eval.
    "rtb-train": {"max_steps": 40, "learning_rate": 3e-2},
    # A long GRPO run to cancel in the middle.
    "rtb-cancel": {"max_steps": 400},
    # Spares for the MCP and demo tests of colleagues.
    "rtb-mcp": {"max_steps": 10, "composite": 0.0, "held_out_threshold": 0.0, "max_regressions": 1000},
    "rtb-demo": {"max_steps": 10},
    # Imported OpenAI graders judged by the tiny model itself (test_graders_vllm.py).
    "rtb-graders": {"max_steps": 10},
}


@dataclass(eq=False)
class JobRun:
    """A followed job: every event seen (in order) and the final ``job.get`` record."""

    job_id: str
    events: list[JobEvent]
    job: dict[str, Any]

    def of_kind(self, kind: str) -> list[JobEvent]:
        return [e for e in self.events if e.kind == kind]


@dataclass(eq=False)
class ClusterDaemon:
    """The session's daemon, its home and the tiny model every cluster in it uses."""

    daemon: DaemonProcess
    home: Path
    model_dir: Path

    @property
    def socket_path(self) -> Path:
        return self.daemon.socket_path

    def cluster_dir(self, name: str) -> Path:
        return self.home / name

    def call(self, method: str, params: Mapping[str, Any] | None = None, *, timeout: float = 60.0) -> Any:
        """One call on a fresh connection; raises the daemon's typed error on failure."""
        with RpcClient(self.socket_path, timeout=timeout) as rpc:
            return rpc.call(method, dict(params or {}))

    def wait_job(self, job_id: str, *, timeout: float = JOB_TIMEOUT_S) -> JobRun:
        """Follow ``job_id`` with ``job.watch`` from cursor 0 until it ends (bounded)."""
        events: list[JobEvent] = []
        # The socket timeout bounds each wait for the next event; the deadline bounds the whole.
        deadline = _Deadline(timeout)
        with RpcClient(self.socket_path, timeout=timeout) as rpc:
            rpc.call("job.watch", {"job_id": job_id, "cursor": 0})
            for notice in rpc.notifications():
                deadline.check(f"job {job_id} did not finish")
                if notice.method != JOB_EVENT:
                    continue
                event = notice.decode(JobEvent)
                if event.job_id != job_id:
                    continue
                events.append(event)
                if event.kind == "state" and event.data.get("state") in FINISHED_STATES:
                    break
            job: dict[str, Any] = rpc.call("job.get", {"job_id": job_id})
        return JobRun(job_id=job_id, events=events, job=job)

    def run_eval(self, cluster: str, **params: Any) -> tuple[dict[str, Any], JobRun]:
        """``eval.run`` and follow the job; returns (the eval.run reply, the followed job)."""
        started: dict[str, Any] = self.call("eval.run", {"cluster": cluster, **params})
        return started, self.wait_job(started["jobId"])

    def cli(self, *args: str, timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        """Run ``modelsmith ARGS`` against this daemon (``MODELSMITH_SOCKET``); never raises on rc."""
        env = {**os.environ, "MODELSMITH_SOCKET": str(self.socket_path), "NO_COLOR": "1"}
        return subprocess.run(
            [sys.executable, "-m", "modelsmith.clients.cli", *args],
            capture_output=True, text=True, timeout=timeout, env=env, check=False,
        )

    def engine_core_pids(self) -> set[int]:
        """Pids of the daemon's engine processes (vLLM's engine core lives in one of them): its
        children but the warm trainer and the engine reaper, which come and go on purpose."""
        return {pid for pid in _children(self.daemon.pid) if not _is_helper(pid)}

    def results_lines(self, cluster: str, tag: str) -> list[dict[str, Any]]:
        path = self.home / cluster / "evals" / tag / "results.jsonl"
        return [msgspec.json.decode(line) for line in path.read_bytes().splitlines() if line]

    def summary(self, cluster: str, tag: str) -> dict[str, Any]:
        decoded: dict[str, Any] = msgspec.json.decode(
            (self.home / cluster / "evals" / tag / "summary.json").read_bytes())
        return decoded

    def ledger_entries(self, cluster: str) -> list[dict[str, Any]]:
        path = self.home / cluster / "ledger.jsonl"
        return [msgspec.json.decode(line) for line in path.read_bytes().splitlines() if line.strip()]


class _Deadline:
    def __init__(self, seconds: float) -> None:
        import time

        self._clock = time.monotonic
        self._end = self._clock() + seconds
        self._seconds = seconds

    def check(self, what: str) -> None:
        if self._clock() > self._end:
            raise TimeoutError(f"{what} within {self._seconds} s")


def _is_helper(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # gone: not an engine that stayed
    return b"modelsmith.gpu.trainer" in cmdline or b"modelsmith.gpu.engine_reaper" in cmdline


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    task_dir = Path(f"/proc/{pid}/task")
    for task in task_dir.iterdir() if task_dir.is_dir() else ():
        try:
            text = (task / "children").read_text()
        except OSError:
            continue
        found.update(int(p) for p in text.split())
    return found


def write_session_home(home: Path, model_dir: Path, clusters: Mapping[str, Mapping[str, Any]]) -> None:
    """Write every cluster: the example writes ``rtb-pricing``; others are renamed copies."""
    for name, options in clusters.items():
        with tempfile.TemporaryDirectory(dir=home) as scratch:
            written = rtb_pricing.write_cluster(Path(scratch), model_dir, **options)
            shutil.copytree(written, home / name)


@pytest.fixture(scope="session")
def cluster_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama every session cluster evaluates (tokenizer trained on the rtb corpus)."""
    return build_tiny_model(tmp_path_factory.mktemp("rtb-model") / "model", rtb_pricing.corpus())


@pytest.fixture(scope="session")
def cluster_daemon(
    tmp_path_factory: pytest.TempPathFactory, cluster_model_dir: Path
) -> Iterator[ClusterDaemon]:
    """The session's real daemon (engines on) over a home with :data:`SESSION_CLUSTERS`."""
    home = tmp_path_factory.mktemp("rtb-home")
    write_session_home(home, cluster_model_dir, SESSION_CLUSTERS)
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1"}
    with start_daemon(home, no_engines=False, env=env, stop_timeout=90.0) as daemon:
        yield ClusterDaemon(daemon=daemon, home=home, model_dir=cluster_model_dir)


def cli_json(result: subprocess.CompletedProcess[str]) -> Any:
    """The JSON a ``--json`` CLI call printed on stdout."""
    return msgspec.json.decode(result.stdout.encode())


def event_kinds(events: Sequence[JobEvent]) -> set[str]:
    return {e.kind for e in events}
