"""A catastrophic regex in a real eval: bounded per answer, scored as its own error, and the daemon
keeps answering. The model server is a small OpenAI-compatible HTTP server (the process boundary)
that always answers with the text that makes the pattern backtrack."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from support.daemon_process import start_daemon

ANSWER = "a" * 40 + "!"  # ^(a|a)+$ backtracks 2^40 times on it with plain `re`

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
  - id: catastrophic
    set: core
    domain: adtech
    prompt: say a lot of a
    rubric: {criteria: [{type: regex, pattern: "^(a|a)+$", must_match: full}]}
  - id: ordinary
    set: core
    domain: adtech
    prompt: say a lot of a
    rubric: {criteria: [{type: contains, value: "aaa"}]}
"""

HELD = """\
scenarios:
  - id: held
    set: held-out
    domain: adtech
    prompt: say a lot of a
    rubric: {criteria: [{type: contains, value: "!"}]}
"""


class _Server(BaseHTTPRequestHandler):
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
        self._reply({"id": "x", "object": "chat.completion", "model": "tiny",
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": ANSWER}}],
                     "usage": {"prompt_tokens": 5, "completion_tokens": 41, "total_tokens": 46}})

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def model_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def _home(root: Path, url: str) -> Path:
    cluster = root / "home" / "hostile"
    (cluster / "model").mkdir(parents=True)
    (cluster / "cluster.toml").write_text(CLUSTER_TOML.format(url=url))
    for name, text in (("core", CORE), ("held-out", HELD)):
        (cluster / "scenarios" / name).mkdir(parents=True)
        (cluster / "scenarios" / name / "s.yaml").write_text(text)
    return root / "home"


def test_a_catastrophic_regex_is_bounded_and_the_daemon_keeps_answering(
    short_tmp: Path, model_server: str
) -> None:
    home = _home(short_tmp, model_server)
    with start_daemon(home, no_engines=False) as daemon:
        started = daemon.call("eval.run", {"cluster": "hostile", "tag": "hostile-1"})
        job_id = started["job_id"] if "job_id" in started else started["jobId"]
        deadline = time.monotonic() + 120
        while True:
            # Each ping has the client's 10 s timeout: a match holding the GIL would fail here.
            daemon.call("daemon.ping")
            job = daemon.call("job.get", {"job_id": job_id})
            state = job.get("state") or job["job"]["state"]
            if state in ("succeeded", "failed", "cancelled"):
                break
            assert time.monotonic() < deadline, "the eval did not finish"
            time.sleep(0.05)
        assert state == "succeeded", job

        lines = [json.loads(line) for line in
                 (home / "hostile" / "evals" / "hostile-1" / "results.jsonl").read_text().splitlines()]
        by_id = {line["scenario_id"]: line for line in lines}
        assert by_id["catastrophic"]["criteria"][0]["error_kind"] == "scoring_timeout"
        assert by_id["catastrophic"]["passed"] is False
        assert by_id["ordinary"]["passed"] is True and by_id["held"]["passed"] is True
        summary = json.loads((home / "hostile" / "evals" / "hostile-1" / "summary.json").read_text())
        assert summary["scoring_errors"] == {"scoring_timeout": 1}
        assert daemon.call("daemon.ping") is not None
