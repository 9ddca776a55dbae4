"""A catastrophic regex in a real eval: bounded per answer, scored as its own error, and the daemon
keeps answering. The model server is a small OpenAI-compatible HTTP server (the process boundary)
that always answers with the text that makes the pattern backtrack."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.daemon_process import start_daemon
from support.model_server import ModelServer, run_eval_job, serve_model, write_served_cluster

ANSWER = "a" * 40 + "!"  # ^(a|a)+$ backtracks 2^40 times on it with plain `re`

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


@pytest.fixture
def model_server() -> Iterator[ModelServer]:
    with serve_model(lambda prompt, index: ANSWER, usage=(5, 41)) as server:
        yield server


def test_a_catastrophic_regex_is_bounded_and_the_daemon_keeps_answering(
    short_tmp: Path, model_server: ModelServer
) -> None:
    home = write_served_cluster(short_tmp / "home", "hostile", model_server.url, core=CORE,
                                held_out=HELD)
    with start_daemon(home, no_engines=False) as daemon:
        # Every call has the client's 10 s timeout: a match holding the GIL would fail here.
        job = run_eval_job(daemon, {"cluster": "hostile", "tag": "hostile-1"})
        state = job.get("state") or job["job"]["state"]
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
