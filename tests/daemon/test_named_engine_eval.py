"""Evals on named engines through a real daemon: the cluster's governed set on an
OpenAI-compatible server named in modelsmith.toml (a small local HTTP server: the process
boundary), tagged with the engine, recorded, capped by ``workers``, never promotion evidence;
an unreachable engine fails its eval alone."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from support.daemon_process import DaemonProcess, start_daemon

from modelsmith.errors import NotFound, ValidationError

CLUSTER_TOML = """\
domain = "adtech"

[model]
base = "model"

[engine]
kind = "openai"
url = "{url}"
model = "tiny"

[thresholds]
composite = 0.5
held_out = 0.5
"""

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


@dataclass
class ModelServer:
    url: str
    answer: str
    delay_s: float = 0.0
    in_flight: int = 0
    max_in_flight: int = 0
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _serve(answer: str, delay_s: float = 0.0) -> Iterator[ModelServer]:
    state = ModelServer(url="", answer=answer, delay_s=delay_s)

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # /v1/models
            self._reply({"object": "list", "data": [{"id": "tiny", "object": "model"}]})

        def do_POST(self) -> None:  # /v1/chat/completions
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with state.lock:
                state.in_flight += 1
                state.requests += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                time.sleep(state.delay_s)
                self._reply({"id": "x", "object": "chat.completion", "model": "tiny",
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": state.answer}}],
                             "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}})
            finally:
                with state.lock:
                    state.in_flight -= 1

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def cluster_server() -> Iterator[ModelServer]:
    yield from _serve("no idea")  # the cluster's own engine fails every scenario


@pytest.fixture
def frontier_server() -> Iterator[ModelServer]:
    yield from _serve("CPM is the cost per mille", delay_s=0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _home(root: Path, cluster_url: str) -> Path:
    cluster = root / "home" / "shop"
    (cluster / "model").mkdir(parents=True)
    (cluster / "cluster.toml").write_text(CLUSTER_TOML.format(url=cluster_url))
    for name, text in (("core", CORE), ("held-out", HELD)):
        (cluster / "scenarios" / name).mkdir(parents=True)
        (cluster / "scenarios" / name / "s.yaml").write_text(text)
    return root / "home"


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


def _wait(daemon: DaemonProcess, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while True:
        job = daemon.call("job.get", {"job_id": job_id})
        job = job.get("job", job)
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return dict(job)
        assert time.monotonic() < deadline, "the eval did not finish"
        time.sleep(0.05)


def _ledger(home: Path) -> list[dict[str, Any]]:
    path = home / "shop" / "ledger.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_an_eval_on_a_named_engine_is_scored_recorded_capped_and_never_evidence(
    short_tmp: Path, cluster_server: ModelServer, frontier_server: ModelServer
) -> None:
    home = _home(short_tmp, cluster_server.url)
    with start_daemon(home, no_engines=False, config_toml=_config(frontier_server.url)) as daemon:
        own = daemon.call("eval.run", {"cluster": "shop", "tag": "own-1"})
        assert _wait(daemon, own["jobId"])["state"] == "succeeded"

        started = daemon.call("eval.run", {"cluster": "shop", "engine": "frontier", "workers": 2})
        assert started["tag"] == "shop-frontier-full"
        job = _wait(daemon, started["jobId"])
        assert job["state"] == "succeeded", job
        assert frontier_server.requests == 7
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
        job = _wait(daemon, started["jobId"])
        assert job["state"] == "failed"
        assert job["error"]["code"] == 1007, job["error"]
        failed = [e["data"] for e in _ledger(home) if e["kind"] == "eval.failed"]
        assert [e["tag"] for e in failed] == [started["tag"]]
        assert daemon.call("daemon.ping") is not None
        again = daemon.call("eval.run", {"cluster": "shop", "engine": "frontier"})
        assert _wait(daemon, again["jobId"])["state"] == "succeeded"
        own = daemon.call("eval.run", {"cluster": "shop"})
        assert _wait(daemon, own["jobId"])["state"] == "succeeded"
