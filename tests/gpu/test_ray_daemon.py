"""The real daemon with ``[ray] address`` set, on a two-node Ray cluster on the CPU.

The daemon (its ledger, socket, supervisors) stays on "its box", the head node; its engine
actor and its trainer ask for ``gpu_node``, which only the second node has. An eval runs on the
engine actor; a GRPO job's Ray worker is SIGKILLed mid-job (``[training] retries`` is 0 by
default): the job fails with a TrainerError, the ledger records that end once and verifies, and
no adapter is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray")

import ray
from ray.cluster_utils import Cluster
from support.cluster_daemon import FINISHED_STATES, ClusterDaemon, write_session_home
from support.daemon_process import start_daemon

from modelsmith.rpc.client import RpcClient
from modelsmith.rpc.schema.jobs import JOB_EVENT, JobEvent

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]

CLUSTER = "rtb-ray"


@pytest.fixture(scope="module")
def ray_daemon(tmp_path_factory: pytest.TempPathFactory,
               cluster_model_dir: Path) -> Iterator[tuple[ClusterDaemon, Cluster]]:
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"daemon_box": 1}, "include_dashboard": False})
    cluster.add_node(num_cpus=2, resources={"gpu_node": 1})
    ray.init(address=cluster.address, namespace="modelsmith-test", log_to_driver=False)
    home = tmp_path_factory.mktemp("ray-home")
    write_session_home(home, cluster_model_dir, {CLUSTER: {"max_steps": 400}})
    config = (f'[ray]\naddress = "{cluster.address}"\nnamespace = "modelsmith-test"\n'
              '[ray.engine]\nnum_cpus = 1\nnum_gpus = 0\nresources = { gpu_node = 0.5 }\n'
              '[ray.trainer]\nnum_cpus = 1\nnum_gpus = 0\nresources = { gpu_node = 0.5 }\n')
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1"}
    try:
        with start_daemon(home, no_engines=False, config_toml=config, env=env,
                          stop_timeout=90.0) as daemon:
            yield ClusterDaemon(daemon=daemon, home=home, model_dir=cluster_model_dir), cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def gpu_node_id() -> str:
    from modelsmith.gpu.ray_backend import cluster_nodes

    return str(next(n for n in cluster_nodes() if "gpu_node" in n["resources"])["node_id"])


def trainer_actor_pids() -> list[int]:
    """Ray names a worker's process after the actor method it runs: ``ray::TrainerActor...``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"ray::TrainerActor"):
            pids.append(int(entry.name))
    return pids


def follow_and_kill_on_first_metric(daemon: ClusterDaemon, job_id: str) -> tuple[list[JobEvent],
                                                                                 dict[str, Any]]:
    events: list[JobEvent] = []
    killed = False
    with RpcClient(daemon.socket_path, timeout=400) as rpc:
        rpc.call("job.watch", {"job_id": job_id, "cursor": 0})
        for notice in rpc.notifications():
            if notice.method != JOB_EVENT:
                continue
            event = notice.decode(JobEvent)
            if event.job_id != job_id:
                continue
            events.append(event)
            if event.kind == "metric" and not killed:
                pids = trainer_actor_pids()
                assert len(pids) == 1, pids
                os.kill(pids[0], signal.SIGKILL)
                killed = True
            if event.kind == "state" and event.data.get("state") in FINISHED_STATES:
                break
        job: dict[str, Any] = rpc.call("job.get", {"job_id": job_id})
    assert killed, "the job ended before its first metric"
    return events, job


def test_an_eval_runs_on_the_engine_actor_and_a_killed_trainer_worker_fails_its_job_once(
    ray_daemon: tuple[ClusterDaemon, Cluster],
) -> None:
    daemon, _ = ray_daemon
    _, run = daemon.run_eval(CLUSTER, tag="base", quick=True, adapter="base")
    assert run.job["state"] == "succeeded", run.job
    assert daemon.results_lines(CLUSTER, "base")
    (engine,) = daemon.call("daemon.status")["engines"]
    assert engine["kind"] == "vllm-ray" and engine["state"] == "warm"
    assert gpu_node_id()[:12] in engine["node"]  # placed on the node with gpu_node

    started = daemon.call("train.start", {"cluster": CLUSTER, "eval_tag": "base"})
    _, job = follow_and_kill_on_first_metric(daemon, started["jobId"])
    assert job["state"] == "failed", job
    assert job["error"]["code"] == 1008 and job["error"]["data"]["reason"] == "worker_died"

    entries = daemon.ledger_entries(CLUSTER)
    of_job = [e for e in entries if e["data"].get("job_id") == started["jobId"]]
    assert [e["kind"] for e in of_job] == ["train.started", "train.failed"]
    assert of_job[-1]["data"]["error"]["data"]["reason"] == "worker_died"
    assert not [e for e in entries if e["kind"] == "iteration.advanced"]
    assert not (daemon.cluster_dir(CLUSTER) / "adapters" / "iter-1").exists()
    verify = subprocess.run([sys.executable, "-m", "modelsmith.clients.cli", "ledger", "verify",
                             "--home", str(daemon.home), "--cluster", CLUSTER],
                            capture_output=True, text=True, timeout=120, check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
