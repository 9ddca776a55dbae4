"""Imported OpenAI graders scored in a real eval: a daemon whose cluster engine and named judge
engine are local model servers (the process boundary). The string, similarity and multi
criteria score the cluster's answers; the score_model and label_model graders ask the judge with
a structured reply; the judge's reasoning lands in results.jsonl and never in anything the
judged model is sent; a malformed judge reply is a judge failure."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.daemon_process import start_daemon
from support.model_server import ModelServer, run_eval_job, serve_model, write_served_cluster

DATA = Path(__file__).parent.parent / "loop" / "data"
CORE = """\
scenarios:
  - {id: plain, set: core, domain: geo, prompt: say Paris, rubric: {criteria: [{type: contains, value: Paris}]}}
"""
HELD = """\
scenarios:
  - {id: held, set: held-out, domain: geo, prompt: say Rome, rubric: {criteria: [{type: contains, value: Rome}]}}
"""
CONFIG = """\
[engines.grader]
kind = "openai"
url = "{url}"
model = "tiny"
"""
REASONING = "SECRET-REASONING the country is missing"


def judge_reply(prompt: str, index: int) -> str:
    if '"label"' in prompt:  # the label reply schema names its key
        return '{"label": "correct", "reasoning": "' + REASONING + '"}'
    if "What is the capital of Italy" in prompt:
        return "Score: eight out of ten"  # malformed: a judge failure for that scenario
    return '{"scores": {"result": 8}, "reasoning": "' + REASONING + '"}'


@pytest.fixture
def cluster_server() -> Iterator[ModelServer]:
    with serve_model(lambda prompt, index: "Paris") as server:
        yield server


@pytest.fixture
def grader_server() -> Iterator[ModelServer]:
    with serve_model(judge_reply) as server:
        yield server


def test_imported_graders_score_a_real_eval_and_keep_the_judges_reasoning_from_the_model(
        short_tmp: Path, cluster_server: ModelServer, grader_server: ModelServer) -> None:
    home = write_served_cluster(short_tmp / "home", "geo", cluster_server.url, core=CORE,
                                held_out=HELD)
    with start_daemon(home, no_engines=False,
                      config_toml=CONFIG.format(url=grader_server.url)) as daemon:
        imported = daemon.call("scenarios.import_graders", {
            "cluster": "geo", "set": "core", "name": "capitals",
            "graders": (DATA / "openai_graders_every_kind.json").read_text(),
            "items": (DATA / "openai_items.jsonl").read_text(),
            "judge_engine": "grader", "prompt": "{{item.question}}"})
        assert imported["scenarios"] == 2
        job = run_eval_job(daemon, {"cluster": "geo", "tag": "imported", "type": "core"})
        assert (job.get("state") or job["job"]["state"]) == "succeeded", job

        path = home / "geo" / "evals" / "imported" / "results.jsonl"
        results = {r["scenario_id"]: r for r in map(json.loads, path.read_text().splitlines())}
        france = {c["name"]: c for c in results["capitals-0001"]["criteria"]}
        assert france["exact_city"]["score"] == 1.0 and france["not_london"]["score"] == 1.0
        assert france["quality"]["score"] == pytest.approx(0.8)
        assert france["quality"]["reasoning"] == REASONING
        assert france["quality"]["parts"] == {"result": pytest.approx(0.8)}
        assert france["verdict"]["score"] == 1.0 and france["verdict"]["reasoning"] == REASONING
        assert REASONING not in france["quality"]["detail"]
        assert not results["capitals-0001"]["judge_error"]
        italy = {c["name"]: c for c in results["capitals-0002"]["criteria"]}
        assert italy["exact_city"]["score"] == 0.0  # "Paris" for Rome
        assert italy["quality"]["error_kind"] == "judge_failure"
        assert results["capitals-0002"]["judge_error"] and not results["capitals-0002"]["passed"]

        # The judged model (the cluster's engine) was sent the prompts only: never a judge's
        # reasoning, nor the judge's instructions.
        sent = json.dumps([r["messages"] for r in cluster_server.requests])
        assert REASONING not in sent and "JSON schema" not in sent
        assert "What is the capital of France?" in sent
        # The judge was shown the cluster's answer inside the grader's own messages.
        judged = [str(r["messages"][-1]["content"]) for r in grader_server.requests]
        assert len(judged) == 4 and all("Paris" in p for p in judged)
