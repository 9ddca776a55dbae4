"""The autonomous loop through a real daemon: iterations, the gate, pause/resume, file drops,
and kill -9 at random points with a restart after each.

The daemons here use the OpenAI-compatible engine against one real ``vllm serve`` process on
the tiny model, so a daemon restart costs no engine load; training is the real trainer child.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from support.daemon_process import DaemonProcess, short_tmp_dir, spawn_daemon, start_daemon
from support.vllm_server import VllmServer, vllm_serve

from modelsmith.errors import ConflictError
from modelsmith.examples import rtb_pricing
from modelsmith.examples.tinymodel import build_tiny_model
from modelsmith.loop.records.ledger import verify_file

pytestmark = pytest.mark.vllm

LOOP_TIMEOUT_S = 600.0


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    root = tmp_path_factory.mktemp("served")
    model = build_tiny_model(root / "model", rtb_pricing.corpus())
    with vllm_serve(model, root) as server:
        yield server


def make_cluster(home: Path, server: VllmServer, name: str, **overrides: Any) -> Path:
    settings: dict[str, Any] = {"core": 8, "held_out": 4, "max_steps": 4, **overrides}
    policy = settings.pop("policy", "")
    root = rtb_pricing.write_cluster(home, Path(server.model), **settings)
    if root.name != name:
        root = root.rename(home / name)
    text = (root / "cluster.toml").read_text()
    text = text.replace("[engine]\n", f'[engine]\nkind = "openai"\nurl = "{server.url}"\n')
    text = text.replace("save_steps = 20", "save_steps = 2").replace("min_steps = 20", "min_steps = 0")
    text = text.replace("[policy]\n", f"[policy]\n{policy}")
    (root / "cluster.toml").write_text(text)
    return root


def ledger_kinds(root: Path) -> list[str]:
    return [msgspec.json.decode(line)["kind"] for line in (root / "ledger.jsonl").read_bytes().splitlines()]


def ledger_entries(root: Path) -> list[dict[str, Any]]:
    return [msgspec.json.decode(line) for line in (root / "ledger.jsonl").read_bytes().splitlines()]


def wait_loop(daemon: DaemonProcess, cluster: str, done: Any, timeout: float = LOOP_TIMEOUT_S) -> dict[str, Any]:
    """Poll loop.status until ``done(status)`` (bounded); the loop has no event stream of its own."""
    deadline = time.monotonic() + timeout
    while True:
        status: dict[str, Any] = daemon.call("loop.status", {"cluster": cluster})["loops"][0]
        if done(status):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"loop of {cluster} did not settle: {status}\n{daemon.log_text()[-4000:]}")
        time.sleep(0.25)


def test_the_loop_runs_two_iterations_by_itself_and_stops_at_its_limit(served: VllmServer) -> None:
    with short_tmp_dir() as home:
        root = make_cluster(home, served, "loop-two", composite=1.0, held_out_threshold=1.0,
                            policy="max_iterations = 2\npatience_iterations = 5\n")
        with start_daemon(home, no_engines=False) as daemon:
            daemon.call("loop.start", {"cluster": "loop-two"})
            status = wait_loop(daemon, "loop-two", lambda s: not s["active"])
            assert status["state"] == "idle"
            assert "max_iterations" in status["reason"]
            assert status["run"]["iterations"] == 2
            fleet = daemon.call("fleet.status")["clusters"][0]
            assert fleet["iteration"] == 2 and fleet["phase"] == "idle"
        kinds = ledger_kinds(root)
        assert kinds.count("iteration.advanced") == 2
        assert kinds.count("eval.finished") == 3
        states = [e["data"]["to"] for e in ledger_entries(root) if e["kind"] == "loop.transition"]
        assert states == ["evaluating", "diagnosing", "training", "evaluating", "diagnosing", "training",
                          "evaluating", "idle"]
        assert verify_file(root / "ledger.jsonl").ok


def test_the_loop_stops_at_the_gate_with_a_promotion_request(served: VllmServer) -> None:
    with short_tmp_dir() as home:
        root = make_cluster(home, served, "loop-gate", composite=0.0, held_out_threshold=0.0,
                            max_regressions=1000)
        with start_daemon(home, no_engines=False) as daemon:
            daemon.call("loop.start", {"cluster": "loop-gate"})
            status = wait_loop(daemon, "loop-gate", lambda s: s["state"] == "awaiting_approval")
            assert status["active"]
            cluster = daemon.call("cluster.status", {"cluster": "loop-gate"})
            assert cluster["pending_promotion"] and cluster["phase"] == "awaiting_approval"
            with pytest.raises(ConflictError):
                daemon.call("train.start", {"cluster": "loop-gate", "eval_tag": cluster["last_eval_tag"]})
        kinds = ledger_kinds(root)
        assert kinds.count("promotion.requested") == 1
        assert kinds.count("iteration.advanced") == 1


def test_a_paused_loop_finishes_its_step_waits_and_resumes_where_it_was(served: VllmServer) -> None:
    with short_tmp_dir() as home:
        make_cluster(home, served, "loop-pause", composite=1.0, held_out_threshold=1.0,
                     policy="max_iterations = 1\n")
        with start_daemon(home, no_engines=False) as daemon:
            daemon.call("loop.start", {"cluster": "loop-pause"})
            # Pause while the eval runs (a pause that comes before a step starts holds that step
            # instead, which is right but not what this test is about).
            deadline = time.monotonic() + LOOP_TIMEOUT_S
            while not any(j["kind"] == "eval" and j["state"] == "running"
                          for j in daemon.call("job.list", {"cluster": "loop-pause"})["jobs"]):
                assert time.monotonic() < deadline, "the loop's eval never ran"
                time.sleep(0.02)
            paused = daemon.call("loop.pause", {"cluster": "loop-pause"})
            assert paused["state"] == "paused"
            with pytest.raises(ConflictError):
                daemon.call("loop.pause", {"cluster": "loop-pause"})
            # The eval that was running finishes; the loop stays paused and remembers the next
            # step: diagnosing, or (when the eval ended between the poll and the pause, which a
            # small set on a fast box allows) the step it had already moved on to.
            status = wait_loop(daemon, "loop-pause",
                               lambda s: s["paused_from"] is not None and s["current_job"] is None)
            assert status["state"] == "paused"
            assert status["paused_from"] in ("diagnosing", "training"), status
            assert all(j["state"] != "running" for j in daemon.call("job.list", {"cluster": "loop-pause"})["jobs"])
            resumed = daemon.call("loop.resume", {"cluster": "loop-pause"})
            assert resumed["state"] == status["paused_from"]
            status = wait_loop(daemon, "loop-pause", lambda s: s["state"] == "training" and s["current_job"])
            stopped = daemon.call("loop.stop", {"cluster": "loop-pause"})
            assert stopped["state"] == "idle" and not stopped["active"]
            job = daemon.call("job.get", {"job_id": status["current_job"]})
            assert job["state"] in ("cancelled", "running")  # cancellation is asynchronous


def test_a_good_drop_joins_the_set_and_triggers_an_eval_and_a_bad_one_is_rejected(served: VllmServer) -> None:
    with short_tmp_dir() as home:
        root = make_cluster(home, served, "loop-inbox", composite=1.0, held_out_threshold=1.0,
                            policy="max_iterations = 1\n")
        before = (root / "scenarios" / "core" / "bids.yaml").read_bytes()
        # Dropped while the daemon is down: taken at start.
        (root / "inbox").mkdir(exist_ok=True)
        (root / "inbox" / "bad.yaml").write_text("scenarios:\n  - id: x1\n    set: core\n    domain: adtech\n"
                                                 "    prompt: hi\n    rubric: {criteria: [{type: nope}]}\n")
        with start_daemon(home, no_engines=False) as daemon:
            rejected = root / "rejected" / "bad.yaml"
            assert rejected.exists() and (root / "rejected" / "bad.yaml.error.txt").exists()
            reason = (root / "rejected" / "bad.yaml.error.txt").read_text()
            assert "scenarios[0].rubric.criteria[0]" in reason and "nope" not in reason
            good = ("scenarios:\n  - id: drop-1\n    set: core\n    domain: adtech\n"
                    "    prompt: connected tv in mars. bucket?\n    reference: high\n"
                    "    rubric: {criteria: [{type: choice, labels: [low, mid, high]}]}\n")
            partial = root / "inbox" / ".drop.yaml.part"
            partial.write_text(good)
            partial.rename(root / "inbox" / "drop.yaml")
            status = wait_loop(daemon, "loop-inbox", lambda s: s["active"] or s["run"]["iterations"] > 0, timeout=60)
            assert "drop.yaml" in status["reason"]
            sets = daemon.call("scenarios.list", {"cluster": "loop-inbox"})
            assert sum(s["count"] for s in sets["sets"]) == 13
            daemon.call("loop.stop", {"cluster": "loop-inbox"})
        assert (root / "scenarios" / "core" / "bids.yaml").read_bytes() == before
        assert not list((root / "inbox").glob("*.yaml"))
        kinds = ledger_kinds(root)
        assert kinds.count("scenarios.ingested") == 1


def _complete_results(root: Path) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path in (root / "evals").glob("*/results.jsonl"):
        ids: list[str] = []
        for line in path.read_bytes().splitlines(keepends=True):
            if line.endswith(b"\n"):
                ids.append(msgspec.json.decode(line)["scenario_id"])
        assert len(ids) == len(set(ids)), f"a scenario counted twice in {path}"
        out[path.parent.name] = set(ids)
    return out


def test_kill_9_at_random_points_loses_and_duplicates_nothing(served: VllmServer) -> None:
    seed = int(os.environ.get("MODELSMITH_FAULT_SEED", random.randrange(1 << 30)))
    print(f"fault-injection seed: {seed} (MODELSMITH_FAULT_SEED={seed} to replay)")
    rng = random.Random(seed)
    kills = 0
    with short_tmp_dir() as home:
        root = make_cluster(home, served, "loop-crash", composite=1.0, held_out_threshold=1.0,
                            max_steps=6, policy="max_iterations = 1\n")
        while True:
            with spawn_daemon(home, no_engines=False) as daemon:
                daemon.wait_ready()
                status = daemon.call("loop.status", {"cluster": "loop-crash"})["loops"][0]
                if kills >= 20:
                    if status["active"]:
                        wait_loop(daemon, "loop-crash", lambda s: not s["active"])
                    assert daemon.terminate() == 0
                    break
                if not status["active"]:
                    # Start a run (again): kill points must fall inside evals and training jobs.
                    daemon.call("loop.start", {"cluster": "loop-crash"})
                time.sleep(rng.uniform(0.3, 6.0))  # the kill point: a random moment of the run
                acknowledged = ledger_entries(root)
                results_before = _complete_results(root)
                os.kill(daemon.pid, signal.SIGKILL)
                daemon.wait_exit()
                kills += 1
                report = verify_file(root / "ledger.jsonl")
                assert report.ok, report
                # Every entry acknowledged before the kill is still there, unchanged.
                assert ledger_entries(root)[: len(acknowledged)] == acknowledged
                results_after = _complete_results(root)
                for tag, ids in results_before.items():
                    assert ids <= results_after.get(tag, set())
        entries = ledger_entries(root)
        assert verify_file(root / "ledger.jsonl").ok
        for tag, ids in _complete_results(root).items():
            if any(e["kind"] == "eval.finished" and e["data"]["tag"] == tag for e in entries):
                assert len(ids) == 12, f"eval {tag} finished with {len(ids)} results"
    finished_tags = [e["data"]["tag"] for e in entries if e["kind"] == "eval.finished"]
    assert finished_tags, "no eval ever finished"
    assert len(finished_tags) == len(set(finished_tags)), "an eval finished twice"
    iterations = [e["data"]["iteration"] for e in entries if e["kind"] == "iteration.advanced"]
    assert iterations == sorted(set(iterations)), "an iteration advanced twice"
    assert iterations, "no training job ever completed"
    assert entries[-1]["kind"] == "loop.transition" and entries[-1]["data"]["to"] == "idle"
    print(f"kills: {kills}, evals finished: {len(finished_tags)}, iterations: {iterations}")
