"""Imported OpenAI graders on the real vLLM engine with the tiny model as its own judge: the
tiny model's replies (four tokens at most) are never the JSON object a structured judge must
give, so every score_model / label_model criterion is a judge failure, reported as such (never a
0 charged to the answer, never tuned into a pass), while the deterministic criteria score the
same answers."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from support.cluster_daemon import ClusterDaemon

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

DATA = Path(__file__).parent / "data"


def test_the_tiny_model_as_structured_judge_fails_honestly_and_the_rest_still_scores(
        cluster_daemon: ClusterDaemon) -> None:
    imported = cluster_daemon.call("scenarios.import_graders", {
        "cluster": "rtb-graders", "set": "core", "name": "capitals", "domain": "capitals",
        "graders": (DATA / "openai_graders_every_kind.json").read_text(),
        "items": (DATA / "openai_items.jsonl").read_text(),
        "judge_engine": "cluster", "prompt": "{{item.question}}"})
    assert imported["scenarios"] == 2
    _, run = cluster_daemon.run_eval("rtb-graders", tag="graders", type="core", domain="capitals")
    assert run.job["state"] == "succeeded", run.job
    lines = cluster_daemon.results_lines("rtb-graders", "graders")
    assert sorted(line["scenario_id"] for line in lines) == ["capitals-0001", "capitals-0002"]
    for line in lines:
        criteria = {c["name"]: c for c in line["criteria"]}
        for judged in ("quality", "verdict"):
            assert criteria[judged]["error_kind"] == "judge_failure", criteria[judged]
            assert "reasoning" not in criteria[judged]  # nothing was read from a malformed reply
        assert line["judge_error"] and not line["passed"]
        deterministic = [c for c in line["criteria"] if c["type"] in ("exact", "contains",
                                                                      "regex", "similarity")]
        assert len(deterministic) == 13 and all(0.0 <= c["score"] <= 1.0 for c in deterministic)
        assert all(c.get("error_kind") != "judge_failure" for c in deterministic)
    summary = cluster_daemon.summary("rtb-graders", "graders")
    assert summary["judge_errors"] == 2
