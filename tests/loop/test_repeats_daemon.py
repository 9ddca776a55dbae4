"""Repeated trials through a real eval: a daemon process, its OpenAI engine, and a model server at
the process boundary that answers one scenario right on every other request (so sampling it four
times makes it flaky), one always right and one never with a valid label."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from support.daemon_process import DaemonProcess, start_daemon

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

CHOICE = '{criteria: [{type: choice, labels: [low, mid, high], value: %s}]}'
CORE = f"""\
scenarios:
  - id: steady
    set: core
    domain: adtech
    prompt: steady bid?
    rubric: {CHOICE % "low"}
  - id: flaky
    set: core
    domain: adtech
    prompt: flaky bid?
    rubric: {CHOICE % "low"}
  - id: broken
    set: core
    domain: adtech
    prompt: broken bid?
    rubric: {CHOICE % "low"}
"""

HELD = f"""\
scenarios:
  - id: held
    set: held-out
    domain: adtech
    prompt: held bid?
    rubric: {CHOICE % "mid"}
"""


class _ModelServer(BaseHTTPRequestHandler):
    lock = threading.Lock()
    flips = itertools.count()
    requests: list[dict[str, Any]] = []

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
        request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        prompt = request["messages"][-1]["content"]
        with self.lock:
            self.requests.append(request)
            flip = next(self.flips) if prompt.startswith("flaky") else 0
        if prompt.startswith("steady"):
            answer = "low"
        elif prompt.startswith("flaky"):
            answer = "low" if flip % 2 == 0 else "high"  # a valid label, the wrong one
        elif prompt.startswith("held"):
            answer = "mid"
        else:
            answer = "banana"  # not a label at all: format and substance both lost
        self._reply({"id": "x", "object": "chat.completion", "model": "tiny",
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": answer}}],
                     "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}})

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def model_server() -> Iterator[str]:
    _ModelServer.requests = []
    _ModelServer.flips = itertools.count()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ModelServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def _home(root: Path, url: str) -> Path:
    cluster = root / "home" / "repeats"
    (cluster / "model").mkdir(parents=True)
    (cluster / "cluster.toml").write_text(CLUSTER_TOML.format(url=url))
    for name, text in (("core", CORE), ("held-out", HELD)):
        (cluster / "scenarios" / name).mkdir(parents=True)
        (cluster / "scenarios" / name / "s.yaml").write_text(text)
    return root / "home"


def _run_eval(daemon: DaemonProcess, params: dict[str, Any]) -> None:
    started = daemon.call("eval.run", {"cluster": "repeats", **params})
    job_id = started["job_id"] if "job_id" in started else started["jobId"]
    deadline = time.monotonic() + 120
    while True:
        job = daemon.call("job.get", {"job_id": job_id})
        state = job.get("state") or job["job"]["state"]
        if state in ("succeeded", "failed", "cancelled"):
            break
        assert time.monotonic() < deadline, "the eval did not finish"
        time.sleep(0.05)
    assert state == "succeeded", job


def test_four_trials_at_temperature_one_record_every_trial_and_find_the_flaky_scenario(
    short_tmp: Path, model_server: str
) -> None:
    home = _home(short_tmp, model_server)
    with start_daemon(home, no_engines=False) as daemon:
        _run_eval(daemon, {"tag": "four", "repeats": 4, "temperature": 1.0})

        lines = [json.loads(line) for line in
                 (home / "repeats" / "evals" / "four" / "results.jsonl").read_text().splitlines()]
        summary = daemon.call("eval.summary", {"cluster": "repeats", "tag": "four"})
        diagnosis = daemon.call("diagnose.run", {"cluster": "repeats", "tag": "four"})

        _run_eval(daemon, {"tag": "once"})
        comparison = daemon.call("eval.compare", {"cluster": "repeats", "a": "once", "b": "four"})

    assert sorted((line["scenario_id"], line["trial"]) for line in lines) == sorted(
        (sid, trial) for sid in ("steady", "flaky", "broken", "held") for trial in range(4))
    sampled = [r for r in _ModelServer.requests if r["temperature"] == 1.0]
    assert len(sampled) == 16
    assert len({r["seed"] for r in sampled if r["messages"][-1]["content"].startswith("flaky")}) == 4

    assert summary["repeats"] == 4
    assert summary["flaky"] == ["flaky"]
    assert summary["pass_rates"] == {"broken": 0.0, "flaky": 0.5, "held": 1.0, "steady": 1.0}
    assert summary["pass_at_k"] == 0.5  # steady and held passed all four
    assert summary["scored"] == 4
    # Scenario scores are trial means: steady 1, flaky 0.5, broken 0, held 1.
    assert summary["composite"] == pytest.approx(2.5 / 4)
    # A valid label is format, the right label substance: broken loses both, flaky only substance.
    assert summary["format_score"] == pytest.approx(3 / 4)
    assert summary["substance_score"] == pytest.approx(2.5 / 4)
    low, high = summary["composite_ci95"]
    assert low <= summary["composite"] <= high
    assert summary["held_out_ci95"] == [1.0, 1.0]

    assert diagnosis["flaky"] == ["flaky"] and diagnosis["pass_rates"] == {"flaky": 0.5}
    assert diagnosis["consistent_failures"] == ["broken"]
    assert [p["scenario_ids"] for p in diagnosis["patterns"]] == [["broken"]]

    paired = comparison["paired"]
    assert paired["n"] == 4
    assert comparison["format_delta"] == 0.0
    assert comparison["substance_delta"] == pytest.approx(summary["substance_score"]
                                                          - comparison["substance_a"])
