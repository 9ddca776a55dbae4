"""Judges by name through a real daemon: an ``llm_judge`` criterion's ``engine`` is a named
engine from modelsmith.toml or ``cluster`` (the cluster's own engine), each asked for its own
criteria; a scenario naming an engine that does not exist is refused when the sets load, with
the name, where it is written and the names that do exist. The model servers are small local
HTTP servers (the process boundary)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.daemon_process import start_daemon
from support.model_server import ModelServer, run_eval_job, serve_model, write_served_cluster

from modelsmith.errors import ValidationError
from modelsmith.loop.scoring.scenarios import load_catalog, parse_scenarios

JUDGED = """\
scenarios:
  - id: by-grader-1
    set: core
    domain: adtech
    prompt: what is CPM
    rubric: {criteria: [{type: llm_judge, engine: grader}]}
  - id: by-grader-2
    set: core
    domain: adtech
    prompt: what is CPC
    rubric: {criteria: [{type: llm_judge, engine: grader}, {type: contains, value: "no"}]}
  - id: by-cluster
    set: core
    domain: adtech
    prompt: what is CTR
    rubric: {criteria: [{type: llm_judge, engine: cluster}]}
"""

HELD = """\
scenarios:
  - id: held
    set: held-out
    domain: adtech
    prompt: what is CPM
    rubric: {criteria: [{type: contains, value: "cost per mille"}]}
"""

UNKNOWN = """\
scenarios:
  - id: by-nobody
    set: core
    domain: adtech
    prompt: what is eCPM
    rubric:
      criteria:
        - {type: contains, value: "x"}
        - {type: llm_judge, engine: gpt-9}
"""

CONFIG = """\
[engines.grader]
kind = "openai"
url = "{url}"
model = "tiny"
"""


def _is_judge_prompt(prompt: str) -> bool:
    return "You are grading an answer" in prompt


@pytest.fixture
def cluster_server() -> Iterator[ModelServer]:
    # The cluster's model answers "no idea" and, asked to judge, gives nothing credit.
    with serve_model(lambda prompt, index: "SCORE: 0" if _is_judge_prompt(prompt) else "no idea") as server:
        yield server


@pytest.fixture
def grader_server() -> Iterator[ModelServer]:
    with serve_model(lambda prompt, index: "The answer is fine.\nSCORE: 1") as server:
        yield server


def test_each_judge_criterion_asks_the_engine_it_names(
    short_tmp: Path, cluster_server: ModelServer, grader_server: ModelServer
) -> None:
    home = write_served_cluster(short_tmp / "home", "shop", cluster_server.url, core=JUDGED, held_out=HELD)
    with start_daemon(home, no_engines=False, config_toml=CONFIG.format(url=grader_server.url)) as daemon:
        job = run_eval_job(daemon, {"cluster": "shop", "tag": "judged"})
        assert (job.get("state") or job["job"]["state"]) == "succeeded", job

        # The grader judged exactly its two criteria, each shown the cluster's own answer.
        assert len(grader_server.requests) == 2
        shown = [str(r["messages"][-1]["content"]) for r in grader_server.requests]
        assert all(_is_judge_prompt(p) and "no idea" in p for p in shown)
        assert sorted("what is CPM" in p for p in shown) == [False, True]
        # The cluster's engine answered the three prompts and judged one criterion.
        cluster_prompts = [str(r["messages"][-1]["content"]) for r in cluster_server.requests]
        assert sum(_is_judge_prompt(p) for p in cluster_prompts) == 1
        assert len(cluster_prompts) == 3 + 1 + 1  # core x3, held-out, the cluster's judge call

        path = home / "shop" / "evals" / "judged" / "results.jsonl"
        results = [json.loads(line) for line in path.read_text().splitlines()]
        scores = {r["scenario_id"]: r["score"] for r in results}
        assert scores == {"by-grader-1": 1.0, "by-grader-2": 1.0, "by-cluster": 0.0, "held": 0.0}
        assert not any(r["judge_error"] for r in results)


def test_a_judge_naming_an_unknown_engine_is_refused_at_load_with_the_known_names(
    short_tmp: Path, cluster_server: ModelServer, grader_server: ModelServer
) -> None:
    home = write_served_cluster(short_tmp / "home", "shop", cluster_server.url, core=JUDGED, held_out=HELD)
    (home / "shop" / "scenarios" / "core" / "bad.yaml").write_text(UNKNOWN)
    with start_daemon(home, no_engines=False, config_toml=CONFIG.format(url=grader_server.url)) as daemon:
        status = daemon.call("cluster.status", {"cluster": "shop"})
        error = status["status_error"]
        assert error is not None
        assert "bad.yaml:" in error and "scenarios[0].rubric.criteria[1].engine" in error
        assert "'gpt-9'" in error and "cluster, grader" in error
        # The daemon keeps serving; the cluster's evals are refused until the file is fixed.
        assert daemon.call("daemon.ping") is not None
        verified = daemon.call("scenarios.verify", {"cluster": "shop"})
        assert verified["ok"] is False and verified["error"]["data"]["known"] == ["cluster", "grader"]
        (home / "shop" / "scenarios" / "core" / "bad.yaml").unlink()
        assert daemon.call("scenarios.verify", {"cluster": "shop"})["ok"] is True
        assert daemon.call("cluster.status", {"cluster": "shop"})["status_error"] is None


def test_the_loader_names_the_line_field_and_known_engines(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_scenarios(UNKNOWN.encode(), filename="bad.yaml", judge_engines={"grader", "frontier"})
    data = caught.value.data
    assert data["kind"] == "unknown_engine" and data["engine"] == "gpt-9"
    assert data["field"] == "scenarios[0].rubric.criteria[1].engine" and data["line"] == 9
    assert data["known"] == ["cluster", "frontier", "grader"]
    # Without the daemon's names (a bare loader) any name loads; with them, known ones do.
    assert len(parse_scenarios(UNKNOWN.encode(), filename="bad.yaml")) == 1
    ok = JUDGED.encode()
    assert len(parse_scenarios(ok, filename="ok.yaml", judge_engines={"grader"})) == 3
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "a.yaml").write_text(UNKNOWN)
    with pytest.raises(ValidationError) as from_catalog:
        load_catalog(tmp_path, judge_engines=frozenset())
    assert json.dumps(from_catalog.value.data["known"]) == '["cluster"]'
