"""Repeated trials through a real eval: a daemon process, its OpenAI engine, and a model server at
the process boundary that answers one scenario right on every other request (so sampling it four
times makes it flaky), one always right and one never with a valid label."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.daemon_process import DaemonProcess, start_daemon
from support.model_server import ModelServer, run_eval_job, serve_model, write_served_cluster

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


def _answer(prompt: str, index: int, flips: itertools.count[int]) -> str:
    if prompt.startswith("steady"):
        return "low"
    if prompt.startswith("flaky"):
        return "low" if next(flips) % 2 == 0 else "high"  # a valid label, the wrong one
    if prompt.startswith("held"):
        return "mid"
    return "banana"  # not a label at all: format and substance both lost


@pytest.fixture
def model_server() -> Iterator[ModelServer]:
    flips = itertools.count()
    with serve_model(lambda prompt, index: _answer(prompt, index, flips)) as server:
        yield server


def _home(root: Path, url: str) -> Path:
    return write_served_cluster(root / "home", "repeats", url, core=CORE, held_out=HELD)


def _run_eval(daemon: DaemonProcess, params: dict[str, Any]) -> None:
    job = run_eval_job(daemon, {"cluster": "repeats", **params})
    assert (job.get("state") or job["job"]["state"]) == "succeeded", job


def test_four_trials_at_temperature_one_record_every_trial_and_find_the_flaky_scenario(
    short_tmp: Path, model_server: ModelServer
) -> None:
    home = _home(short_tmp, model_server.url)
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
    sampled = [r for r in model_server.requests if r["temperature"] == 1.0]
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
