"""GRPO training end to end through the real daemon: metrics, adapter, ledger, hot load, cancel."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest

from modelsmith.errors import ConflictError
from modelsmith.rpc.client import RpcClient
from modelsmith.rpc.schema.jobs import JOB_EVENT, JobEvent

if TYPE_CHECKING:
    from support.cluster_daemon import ClusterDaemon

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

TRAIN_TIMEOUT_S = 400.0


def base_eval(cluster_daemon: ClusterDaemon, cluster: str, tag: str) -> None:
    _, run = cluster_daemon.run_eval(cluster, tag=tag, quick=True, adapter="base")
    assert run.job["state"] == "succeeded", run.job


def engine_statuses(cluster_daemon: ClusterDaemon) -> list[dict[str, Any]]:
    engines: list[dict[str, Any]] = cluster_daemon.call("daemon.status")["engines"]
    return engines


def test_training_streams_metrics_saves_iter_1_advances_the_ledger_and_hot_loads_into_the_same_engine(
    cluster_daemon: ClusterDaemon,
) -> None:
    cluster = "rtb-train"
    base_eval(cluster_daemon, cluster, "base")
    engines_before = engine_statuses(cluster_daemon)
    children_before = cluster_daemon.engine_core_pids()

    started = cluster_daemon.call("train.start", {"cluster": cluster, "eval_tag": "base"})
    assert started["status"] == "queued" and started["cluster"] == cluster
    assert isinstance(started["jobId"], str) and started["estimated_duration_minutes"] >= 0
    run = cluster_daemon.wait_job(started["jobId"], timeout=TRAIN_TIMEOUT_S)

    assert run.job["state"] == "succeeded", run.job
    metrics = run.of_kind("metric")
    assert metrics and all("step" in m.data for m in metrics)
    result = run.job["result"]
    assert result["adapter"] == "iter-1" and result["hot_load_seconds"] >= 0
    adapter_dir = cluster_daemon.cluster_dir(cluster) / "adapters" / "iter-1"
    assert (adapter_dir / "manifest.json").is_file()
    training_manifest = json.loads((adapter_dir / "training_manifest.json").read_text())
    assert training_manifest["leakage_check"]["ok"] is True
    assert all(ref["id"].startswith("core-") for ref in training_manifest["scenarios"])
    advanced = [e for e in cluster_daemon.ledger_entries(cluster) if e["kind"] == "iteration.advanced"]
    assert advanced[-1]["data"]["adapter_hash"] == result["adapter_hash"]

    status = cluster_daemon.call("train.status", {"job_id": started["jobId"]})
    assert status["adapter"] == "iter-1" and len(status["metrics"]) == len(metrics)

    follow_up = result["follow_up_eval"]
    follow_run = cluster_daemon.wait_job(follow_up["job_id"])
    assert follow_run.job["state"] == "succeeded", follow_run.job
    assert cluster_daemon.summary(cluster, follow_up["tag"])["adapter"] == "iter-1"
    # The same engine process serves the new adapter: no restart, no new engine core.
    engines_after = engine_statuses(cluster_daemon)
    assert [e.get("restarts", 0) for e in engines_after] == [e.get("restarts", 0) for e in engines_before]
    assert [e.get("load_seconds") for e in engines_after] == [e.get("load_seconds") for e in engines_before]
    assert cluster_daemon.engine_core_pids() == children_before
    assert any(f"{cluster}:iter-1" in e.get("adapters", []) for e in engines_after)
    # ... and its answers differ from the base model's.
    before = {r["scenario_id"]: r["response"] for r in cluster_daemon.results_lines(cluster, "base")}
    after = {r["scenario_id"]: r["response"] for r in cluster_daemon.results_lines(cluster, follow_up["tag"])}
    assert before.keys() == after.keys()
    assert before != after


def test_cancelling_a_running_training_job_cancels_it_without_advancing_and_a_second_start_conflicts(
    cluster_daemon: ClusterDaemon,
) -> None:
    cluster = "rtb-cancel"
    base_eval(cluster_daemon, cluster, "base")
    started = cluster_daemon.call("train.start", {"cluster": cluster, "eval_tag": "base"})
    job_id = started["jobId"]

    with RpcClient(cluster_daemon.socket_path, timeout=TRAIN_TIMEOUT_S) as rpc:
        rpc.call("job.watch", {"job_id": job_id, "cursor": 0})
        final_state = None
        cancelled = False
        for notice in rpc.notifications():
            if notice.method != JOB_EVENT:
                continue
            event = notice.decode(JobEvent)
            if event.kind == "metric" and not cancelled:
                with pytest.raises(ConflictError) as caught:
                    cluster_daemon.call("train.start", {"cluster": cluster, "eval_tag": "base"})
                assert caught.value.code == 1003
                cluster_daemon.call("train.cancel", {"job_id": job_id})
                cancelled = True
            if event.kind == "state" and event.data.get("state") in {"succeeded", "failed", "cancelled"}:
                final_state = event.data["state"]
                break

    assert cancelled and final_state == "cancelled"
    entries = cluster_daemon.ledger_entries(cluster)
    failed = [e for e in entries if e["kind"] == "train.failed"]
    assert failed and failed[-1]["data"]["error"]["name"] == "cancelled"  # code and name, not only text
    assert not [e for e in entries if e["kind"] == "iteration.advanced"]
    # The trainer saves on SIGTERM (so a job can resume), but nothing is promoted to an iteration.
    assert cluster_daemon.call("train.status", {"job_id": job_id})["job"]["state"] == "cancelled"
