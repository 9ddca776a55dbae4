"""Evals on named engines through a real daemon: the cluster's governed set on an
OpenAI-compatible server named in modelsmith.toml (a small local HTTP server: the process
boundary), tagged with the engine, recorded, capped by ``workers``, never promotion evidence;
an unreachable engine fails its eval alone."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.daemon_process import start_daemon, wait_job
from support.model_server import ModelServer, serve_model, write_served_cluster

from modelsmith.errors import NotFound, ValidationError

CORE = """\
scenarios:
""" + "".join(f"""\
  - id: core-{i}
    set: core
    domain: adtech
    prompt: what is CPM {i}
    rubric: {{criteria: [{{type: contains, value: "cost per mille"}}]}}
""" for i in range(6))

HELD = """\
scenarios:
  - id: held
    set: held-out
    domain: adtech
    prompt: what is CPM
    rubric: {criteria: [{type: contains, value: "cost per mille"}]}
"""


@pytest.fixture
def cluster_server() -> Iterator[ModelServer]:
    with serve_model(lambda prompt, index: "no idea", usage=(7, 3)) as server:  # fails all
        yield server


@pytest.fixture
def frontier_server() -> Iterator[ModelServer]:
    with serve_model(lambda prompt, index: "CPM is the cost per mille", delay_s=0.05,
                     usage=(7, 3)) as server:
        yield server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _home(root: Path, cluster_url: str) -> Path:
    return write_served_cluster(root / "home", "shop", cluster_url, core=CORE, held_out=HELD)


def _config(frontier_url: str) -> str:
    return f"""\
[engines.frontier]
kind = "openai"
url = "{frontier_url}"
model = "tiny"
max_concurrency = 4
usd_per_mtok_in = 1.0
usd_per_mtok_out = 2.0

[engines.gone]
kind = "openai"
url = "http://127.0.0.1:{_free_port()}/v1"
model = "tiny"
timeout_s = 1.5
"""



def _ledger(home: Path) -> list[dict[str, Any]]:
    path = home / "shop" / "ledger.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_an_eval_on_a_named_engine_is_scored_recorded_capped_and_never_evidence(
    short_tmp: Path, cluster_server: ModelServer, frontier_server: ModelServer
) -> None:
    home = _home(short_tmp, cluster_server.url)
    with start_daemon(home, no_engines=False, config_toml=_config(frontier_server.url)) as daemon:
        own = daemon.call("eval.run", {"cluster": "shop", "tag": "own-1"})
        assert wait_job(daemon, own["jobId"])["state"] == "succeeded"

        started = daemon.call("eval.run", {"cluster": "shop", "engine": "frontier", "workers": 2})
        assert started["tag"] == "shop-frontier-full"
        job = wait_job(daemon, started["jobId"])
        assert job["state"] == "succeeded", job
        assert len(frontier_server.requests) == 7
        assert frontier_server.max_in_flight <= 2  # workers caps the eval's requests

        summary = daemon.call("eval.summary", {"cluster": "shop", "tag": "shop-frontier-full"})
        assert summary["engine"] == "frontier" and summary["adapter"] is None
        assert summary["composite"] == 1.0 and summary["passed"] is True
        results = (home / "shop" / "evals" / "shop-frontier-full" / "results.jsonl").read_text()
        assert "cost per mille" in results
        lines = [json.loads(line) for line in results.splitlines()]
        assert {(r["prompt_tokens"], r["completion_tokens"]) for r in lines} == {(7, 3)}
        assert all(r["latency_s"] >= 0.05 for r in lines) and all(r["ttft_s"] is None for r in lines)
        assert 0.05 <= summary["latency_p50_s"] <= summary["latency_p95_s"]
        assert summary["tokens_per_s"] > 0
        # (7 x $1 + 3 x $2) per million tokens per answer
        assert summary["cost_per_1k_scenarios_usd"] == pytest.approx(0.013)
        own_summary = daemon.call("eval.summary", {"cluster": "shop", "tag": "own-1"})
        assert own_summary["cost_per_1k_scenarios_usd"] is None  # no prices for its own engine
        assert own_summary["latency_p50_s"] is not None

        finished = {e["data"]["tag"]: e["data"] for e in _ledger(home) if e["kind"] == "eval.finished"}
        assert finished["shop-frontier-full"]["engine"] == "frontier"
        assert finished["own-1"]["engine"] is None
        started_events = [e["data"] for e in _ledger(home) if e["kind"] == "eval.started"]
        assert [e["engine"] for e in started_events] == [None, "frontier"]

        # Not the cluster's evidence: its last eval is its own, and the gate never takes it.
        status = daemon.call("cluster.status", {"cluster": "shop"})
        assert status["last_eval_tag"] == "own-1"
        report = daemon.call("policy.check", {"cluster": "shop", "eval_tag": "shop-frontier-full"})
        checks = {c["check"]: c for c in report["checks"]}
        assert checks["eval_of_candidate"]["passed"] is False
        assert report["passed"] is False
        default = daemon.call("policy.check", {"cluster": "shop"})
        assert default["eval_tag"] == "own-1"
        listed = daemon.call("eval.list", {"cluster": "shop"})["evals"]
        assert {e["tag"]: e["engine"] for e in listed} == {"own-1": None, "shop-frontier-full": "frontier"}

        with pytest.raises(ValidationError):
            daemon.call("eval.run", {"cluster": "shop", "engine": "frontier", "adapter": "base"})
        with pytest.raises(NotFound) as caught:
            daemon.call("eval.run", {"cluster": "shop", "engine": "nope"})
        assert caught.value.data["known"] == ["frontier", "gone"]


def test_an_unreachable_named_engine_fails_its_eval_and_nothing_else(
    short_tmp: Path, cluster_server: ModelServer, frontier_server: ModelServer
) -> None:
    home = _home(short_tmp, cluster_server.url)
    with start_daemon(home, no_engines=False, config_toml=_config(frontier_server.url)) as daemon:
        started = daemon.call("eval.run", {"cluster": "shop", "engine": "gone"})
        job = wait_job(daemon, started["jobId"])
        assert job["state"] == "failed"
        assert job["error"]["code"] == 1007, job["error"]
        failed = [e["data"] for e in _ledger(home) if e["kind"] == "eval.failed"]
        assert [e["tag"] for e in failed] == [started["tag"]]
        assert daemon.call("daemon.ping") is not None
        again = daemon.call("eval.run", {"cluster": "shop", "engine": "frontier"})
        assert wait_job(daemon, again["jobId"])["state"] == "succeeded"
        own = daemon.call("eval.run", {"cluster": "shop"})
        assert wait_job(daemon, own["jobId"])["state"] == "succeeded"
