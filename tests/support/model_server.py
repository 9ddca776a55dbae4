"""An OpenAI-compatible model server at the process boundary, and clusters that use it.

A threaded ``http.server`` answering ``GET /v1/models`` and ``POST /v1/chat/completions`` with
whatever ``answer(prompt, request_index)`` returns; it records every request and the most
requests it ever had in flight. Tests drive a real daemon (and its real OpenAI engine) against
it when what matters is the daemon, not the model: hostile scoring, repeats, named engines.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from support.daemon_process import DaemonProcess

Answer = Callable[[str, int], str]

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


@dataclass
class ModelServer:
    """What the server saw. ``url`` is its ``/v1`` base."""

    answer: Answer
    delay_s: float = 0.0
    usage: tuple[int, int] = (5, 1)  # prompt, completion tokens reported
    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class _BurstServer(ThreadingHTTPServer):
    # socketserver's listen backlog of 5 drops connects when a client opens 16 at once on a busy
    # box (a reset request is then a transport error, not an answer): allow a burst.
    request_queue_size = 128


@contextmanager
def serve_model(answer: Answer, *, delay_s: float = 0.0,
                usage: tuple[int, int] = (5, 1)) -> Iterator[ModelServer]:
    """Run a model server on a free loopback port for the ``with`` block."""
    state = ModelServer(answer=answer, delay_s=delay_s, usage=usage)

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
            request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            prompt = str(request["messages"][-1]["content"])
            with state.lock:
                index = len(state.requests)
                state.requests.append(request)
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                time.sleep(state.delay_s)
                prompt_tokens, completion_tokens = state.usage
                self._reply({
                    "id": f"x{index}", "object": "chat.completion", "model": "tiny",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant",
                                             "content": state.answer(prompt, index)}}],
                    "usage": {"prompt_tokens": prompt_tokens,
                              "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens}})
            finally:
                with state.lock:
                    state.in_flight -= 1

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = _BurstServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def write_served_cluster(home: Path, name: str, url: str, *, core: str, held_out: str,
                         cluster_toml: str = CLUSTER_TOML) -> Path:
    """A cluster whose engine is the model server at ``url``; returns the home."""
    cluster = home / name
    (cluster / "model").mkdir(parents=True)
    (cluster / "cluster.toml").write_text(cluster_toml.format(url=url))
    for set_name, text in (("core", core), ("held-out", held_out)):
        (cluster / "scenarios" / set_name).mkdir(parents=True)
        (cluster / "scenarios" / set_name / "s.yaml").write_text(text)
    return home


def run_eval_job(daemon: DaemonProcess, params: dict[str, Any], *,
                 timeout_s: float = 120.0) -> dict[str, Any]:
    """Start ``eval.run`` and wait for its job to end (pinging on the way: each call has the
    client's timeout, so a daemon that stopped answering fails here). Returns the job."""
    started = daemon.call("eval.run", params)
    job_id = started["job_id"] if "job_id" in started else started["jobId"]
    deadline = time.monotonic() + timeout_s
    while True:
        daemon.call("daemon.ping")
        job: dict[str, Any] = daemon.call("job.get", {"job_id": job_id})
        state = job.get("state") or job["job"]["state"]
        if state in ("succeeded", "failed", "cancelled"):
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"eval job {job_id} did not end within {timeout_s} s")
        time.sleep(0.05)
