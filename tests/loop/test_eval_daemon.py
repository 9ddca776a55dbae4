"""Evals end to end through the real daemon with a warm vLLM engine, over its socket and CLI."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import pytest

from modelsmith.errors import ConflictError, InvalidParams, NotFound
from modelsmith.examples import rtb_pricing
from modelsmith.loop.cluster.config import load_cluster
from modelsmith.loop.cluster.fleet import ClusterRuntime
from modelsmith.loop.eval.run import RESULTS_FILE, eval_dir, execute_eval
from modelsmith.loop.eval.service import EvalService
from modelsmith.loop.jobs.registry import Job
from modelsmith.rpc.schema.evals import EvalRunParams

if TYPE_CHECKING:
    from support.cluster_daemon import ClusterDaemon

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

SUMMARY_KEYS = {"composite", "held_out", "by_set", "by_tag", "gates", "regressions", "duration_s"}
RESULT_KEYS = {"scenario_id", "set", "response", "reference", "score", "passed", "criteria"}


def cli_json(stdout: str) -> Any:
    return msgspec.json.decode(stdout.encode())


def test_an_eval_returns_its_job_at_once_streams_progress_and_writes_results_summary_and_ledger(
    cluster_daemon: ClusterDaemon,
) -> None:
    started, run = cluster_daemon.run_eval("rtb-evals", tag="first-full")

    assert started["status"] in {"queued", "started", "running"} and started["tag"] == "first-full"
    assert run.job["state"] == "succeeded", run.job
    assert {"progress", "state"} <= {e.kind for e in run.events}
    progress = run.of_kind("progress")
    assert progress[-1].data["done"] == progress[-1].data["total"] == 36
    lines = cluster_daemon.results_lines("rtb-evals", "first-full")
    assert sorted(line["scenario_id"] for line in lines) == sorted({line["scenario_id"] for line in lines})
    assert len(lines) == 36  # 24 core + 12 held-out, one line each
    for line in lines:
        assert RESULT_KEYS <= line.keys()
        assert [c["name"] for c in line["criteria"]] == ["bucket", "one_word"]
    summary = cluster_daemon.summary("rtb-evals", "first-full")
    assert SUMMARY_KEYS <= summary.keys()
    assert set(summary["by_set"]) == {"core", "held-out"}
    assert {"composite", "held_out", "regressions"} == set(summary["gates"])
    assert summary["regressions"]["baseline_tag"] is None
    kinds = [e["kind"] for e in cluster_daemon.ledger_entries("rtb-evals")]
    assert "eval.started" in kinds and "eval.finished" in kinds
    assert kinds.index("eval.started") < kinds.index("eval.finished")


def test_a_second_eval_computes_regressions_against_the_previous_one_and_compare_pairs_them(
    cluster_daemon: ClusterDaemon,
) -> None:
    first = "first-full"
    if not (cluster_daemon.cluster_dir("rtb-evals") / "evals" / first).exists():
        cluster_daemon.run_eval("rtb-evals", tag=first)
    _, run = cluster_daemon.run_eval("rtb-evals", tag="second-full")
    assert run.job["state"] == "succeeded", run.job

    summary = cluster_daemon.summary("rtb-evals", "second-full")
    assert summary["regressions"]["baseline_tag"] == first
    assert summary["regressions"]["compared"] == 36
    comparison = cluster_daemon.call("eval.compare", {"cluster": "rtb-evals", "a": first, "b": "second-full"})
    assert len(comparison["scenarios"]) == 36
    assert comparison["fixed"] + comparison["regressed"] + comparison["unchanged"] == 36
    # Greedy decoding on the same engine: the same answers, so nothing moved.
    assert comparison["composite_delta"] == pytest.approx(0.0)


def test_eval_results_returns_failed_scenarios_with_response_reference_and_breakdown(
    cluster_daemon: ClusterDaemon,
) -> None:
    _, run = cluster_daemon.run_eval(rtb_pricing.CLUSTER, tag="results-probe", quick=True)
    assert run.job["state"] == "succeeded"

    page = cluster_daemon.call("eval.results", {"cluster": rtb_pricing.CLUSTER, "tag": "results-probe"})
    lines = cluster_daemon.results_lines(rtb_pricing.CLUSTER, "results-probe")
    failed = [line for line in lines if not line["passed"]]
    assert page["total"] == len(failed)
    for result in page["results"]:
        assert not result["passed"]
        assert result["reference"] in {"low", "mid", "high"}
        assert "response" in result and result["criteria"]


def test_quick_picks_the_same_deterministic_subset_every_time(cluster_daemon: ClusterDaemon) -> None:
    cluster_daemon.run_eval(rtb_pricing.CLUSTER, tag="quick-a", quick=True)
    cluster_daemon.run_eval(rtb_pricing.CLUSTER, tag="quick-b", quick=True)

    ids_a = [r["scenario_id"] for r in cluster_daemon.results_lines(rtb_pricing.CLUSTER, "quick-a")]
    ids_b = [r["scenario_id"] for r in cluster_daemon.results_lines(rtb_pricing.CLUSTER, "quick-b")]
    assert len(ids_a) == 12  # [eval] quick_size of the example cluster
    assert sorted(ids_a) == sorted(ids_b)
    assert {i.split("-")[0] for i in ids_a} == {"core", "ho"}  # stratified across both sets
    assert cluster_daemon.summary(rtb_pricing.CLUSTER, "quick-a")["quick"] is True


def test_the_cli_exits_1_when_a_gate_fails_and_0_when_every_gate_passes(cluster_daemon: ClusterDaemon) -> None:
    failing = cluster_daemon.cli("eval", "--quick", "--cluster", rtb_pricing.CLUSTER, "--json")
    passing = cluster_daemon.cli("eval", "--quick", "--cluster", "rtb-pass", "--json")

    assert failing.returncode == 1, failing.stderr
    assert cli_json(failing.stdout)["passed"] is False
    assert passing.returncode == 0, passing.stderr
    assert cli_json(passing.stdout)["passed"] is True


def test_an_unknown_tag_is_not_found(cluster_daemon: ClusterDaemon) -> None:
    with pytest.raises(NotFound) as caught:
        cluster_daemon.call("eval.summary", {"cluster": rtb_pricing.CLUSTER, "tag": "no-such-eval"})
    assert caught.value.code == 1001


def test_an_explicit_tag_that_exists_already_is_a_conflict(cluster_daemon: ClusterDaemon) -> None:
    cluster_daemon.run_eval("rtb-pass", tag="taken", quick=True)
    with pytest.raises(ConflictError) as caught:
        cluster_daemon.call("eval.run", {"cluster": "rtb-pass", "tag": "taken"})
    assert caught.value.code == 1003


def test_an_unknown_field_in_eval_run_params_is_invalid_params(cluster_daemon: ClusterDaemon) -> None:
    with pytest.raises(InvalidParams) as caught:
        cluster_daemon.call("eval.run", {"cluster": "rtb-pass", "quik": True})
    assert caught.value.code == -32602


async def test_a_resumed_eval_cuts_the_torn_line_and_counts_no_scenario_twice(
    cluster_model_dir: Path, tmp_path: Path
) -> None:
    from modelsmith.gpu.engine import Sampling
    from modelsmith.gpu.vllm_engine import VllmEngine, cpu_engine_env

    os.environ.update(cpu_engine_env())
    root = rtb_pricing.write_cluster(tmp_path / "home", cluster_model_dir)
    runtime = ClusterRuntime(load_cluster(root))
    await anyio.to_thread.run_sync(runtime.open)
    service = EvalService(None, None, None)  # type: ignore[arg-type]  # plan() reads only the runtime
    sampling = Sampling(temperature=0.0, max_tokens=4)
    engine = VllmEngine("resume", cluster_model_dir, max_model_len=256, max_lora_rank=8, max_loras=1)
    async with anyio.create_task_group() as tg:
        await tg.start(engine.run)
        await engine.wait_ready(timeout=300)
        with anyio.fail_after(300):
            whole_plan = service.plan(runtime, EvalRunParams(cluster=rtb_pricing.CLUSTER, tag="whole", quick=True))
            await execute_eval(runtime, whole_plan, Job("j1", "eval", rtb_pricing.CLUSTER), engine, sampling, baseline=None)
            whole = (eval_dir(runtime, "whole") / RESULTS_FILE).read_bytes().splitlines(keepends=True)
            # A crash mid-append: five whole lines and half of the sixth.
            partial_path = eval_dir(runtime, "resumed") / RESULTS_FILE
            partial_path.parent.mkdir(parents=True)
            partial_path.write_bytes(b"".join(whole[:5]) + whole[5][: len(whole[5]) // 2])
            plan = service.plan(runtime, EvalRunParams(cluster=rtb_pricing.CLUSTER, tag="resumed-plan", quick=True))
            plan = dataclasses.replace(plan, tag="resumed")
            summary = await execute_eval(runtime, plan, Job("j2", "eval", rtb_pricing.CLUSTER), engine, sampling, baseline=None)
        tg.cancel_scope.cancel()

    lines = partial_path.read_bytes().splitlines(keepends=True)
    assert len(lines) == len(whole) == summary.scored == 12
    assert lines[:5] == whole[:5]  # kept as they were, not re-run
    ids = [msgspec.json.decode(line)["scenario_id"] for line in lines]  # every line whole again
    assert len(set(ids)) == len(ids)
    by_id = {msgspec.json.decode(line)["scenario_id"]: msgspec.json.decode(line)["response"] for line in whole}
    assert all(by_id[i] == msgspec.json.decode(line)["response"] for i, line in zip(ids, lines, strict=True))
