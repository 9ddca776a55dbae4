"""The teacher path against a real ``vllm.entrypoints.openai.api_server`` on a tiny model: a real
daemon asks it (as a named engine) for scenarios; a tiny random model cannot write the strict
JSON reply, so the job succeeds with its replies counted as invalid, nothing is written, and the
ledger's synth.finished says exactly that."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.daemon_process import DaemonProcess, start_daemon
from support.model_server import ModelServer, serve_model, write_served_cluster
from support.vllm_server import VllmServer, vllm_serve

from modelsmith.examples import rtb_pricing
from modelsmith.examples.tinymodel import build_tiny_model

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

COUNT = 6
CORE = """\
- id: c-1
  domain: math
  prompt: Add 12 and 7. Answer with the number only.
  reference: "19"
  rubric: {criteria: [{type: exact}]}
- id: c-2
  domain: math
  prompt: Add 30 and 4. Answer with the number only.
  reference: "34"
  rubric: {criteria: [{type: exact}]}
"""
HELD = """\
- id: h-1
  domain: math
  prompt: What is the sum of forty and two?
  reference: "42"
  rubric: {criteria: [{type: exact}]}
"""


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    # Room for the teacher's prompt (schema and example) and its 512-token reply.
    model = build_tiny_model(tmp_path_factory.mktemp("teacher") / "model", rtb_pricing.corpus(),
                             max_position_embeddings=2048)
    with vllm_serve(model, tmp_path_factory.mktemp("logs"), max_model_len=2048,
                    served_name="tiny-teacher") as server:
        yield server


@pytest.fixture(scope="module")
def cluster_server() -> Iterator[ModelServer]:
    with serve_model(lambda prompt, index: "7") as server:
        yield server


def _wait(daemon: DaemonProcess, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 300
    while True:
        job = daemon.call("job.get", {"job_id": job_id})
        job = job.get("job", job)
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return dict(job)
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(0.1)


def test_a_tiny_teachers_malformed_replies_are_counted_invalid_and_nothing_is_kept(
    short_tmp: Path, teacher: VllmServer, cluster_server: ModelServer
) -> None:
    home = write_served_cluster(short_tmp / "home", "shop", cluster_server.url, core=CORE,
                                held_out=HELD)
    config = f'[engines.teacher]\nkind = "openai"\nurl = "{teacher.url}"\nmodel = "tiny-teacher"\n'
    with start_daemon(home, no_engines=False, config_toml=config) as daemon:
        assert _wait(daemon, daemon.call("eval.run", {"cluster": "shop", "tag": "e1"})["jobId"])[
            "state"] == "succeeded"
        job = _wait(daemon, daemon.call("synth.run", {"cluster": "shop", "from_eval": "e1",
                                                      "teacher": "teacher",
                                                      "count": COUNT})["jobId"])
        assert job["state"] == "succeeded", job
        counts = job["result"]["counts"]
        assert counts["generated"] == COUNT
        assert counts["generated"] == sum(v for k, v in counts.items() if k != "generated")
        assert counts["dropped_invalid"] >= COUNT - 1  # a random tiny model writes no schema JSON
        assert job["result"]["teacher_model"] == "tiny-teacher"
        invalid = [r for r in job["result"]["rejections"] if r["reason"] == "invalid"]
        assert invalid and all(r["detail"] for r in invalid)
        ledger = [json.loads(line) for line in (home / "shop" / "ledger.jsonl").read_text().splitlines()]
        (finished,) = [e["data"] for e in ledger if e["kind"] == "synth.finished"]
        assert {k: finished[k] for k in counts} == counts and finished["teacher"] == "teacher"
        if counts["kept"] == 0:
            assert finished["file"] is None
            assert not (home / "shop" / "scenarios" / "synthetic").exists()
