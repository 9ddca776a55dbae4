"""``scenarios.import_graders`` through a real daemon and socket, and the CLI command: the grader
file becomes a governed scenario file (the loader reads it, the ledger records the new set
version), its JSON kept verbatim beside it; a hostile file is a typed error naming the grader and
nothing is written; the daemon keeps serving."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.daemon_process import DaemonProcess, short_tmp_dir, start_daemon, write_cluster

from modelsmith.errors import ConflictError, ValidationError

DATA = Path(__file__).parent.parent / "loop" / "data"
EVERY_KIND = (DATA / "openai_graders_every_kind.json").read_text()
ITEMS = (DATA / "openai_items.jsonl").read_text()


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    with short_tmp_dir() as base:
        home = base / "home"
        write_cluster(home, "adtech")
        with start_daemon(home, socket_path=base / "run" / "ms.sock") as process:
            yield process


@pytest.fixture(autouse=True)
def daemon_still_serves_afterwards(daemon: DaemonProcess) -> Iterator[None]:
    yield
    assert daemon.returncode is None, daemon.log_text()
    assert daemon.call("daemon.ping")["pong"] is True


def params(name: str, **extra: Any) -> dict[str, Any]:
    return {"cluster": "adtech", "set": "core", "name": name, "graders": EVERY_KIND,
            "items": ITEMS, "judge_engine": "cluster", "prompt": "{{item.question}}"} | extra


def scenario_dir(daemon: DaemonProcess, set_name: str = "core") -> Path:
    return daemon.home / "adtech" / "scenarios" / set_name


def test_an_import_writes_a_governed_file_that_loads_with_its_graders_json_beside_it(
        daemon: DaemonProcess) -> None:
    result = daemon.call("scenarios.import_graders", params("capitals"))
    folder = scenario_dir(daemon)
    assert result["scenarios"] == 2 and "core" in result["changed"]
    assert sorted(Path(f).name for f in result["files"]) == ["capitals.graders.json",
                                                            "capitals.jsonl"]
    assert (folder / "capitals.graders.json").read_text() == EVERY_KIND  # verbatim provenance
    assert [m["criterion"] for m in result["mapping"]][-2:] == ["rubric_judge", "label"]
    sets = {s["name"]: s for s in daemon.call("scenarios.verify", {"cluster": "adtech"})["sets"]}
    # the loader reads the scenario file and ignores the .graders.json beside it
    assert sets["core"]["count"] == 2 and sets["core"]["version"] == result["version"]
    assert sets["core"]["files"] == ["core/capitals.jsonl"]
    lines = (daemon.home / "adtech" / "ledger.jsonl").read_text().splitlines()
    changes = [e for e in map(json.loads, lines) if e["kind"] == "scenarios.changed"]
    assert changes[-1]["data"]["versions"]["core"] == result["version"]


def test_a_dry_run_converts_and_checks_and_writes_nothing(daemon: DaemonProcess) -> None:
    result = daemon.call("scenarios.import_graders",
                         params("dry", set="held-out", dry_run=True))
    assert result["dry_run"] and result["scenarios"] == 2 and result["files"] == []
    assert not (scenario_dir(daemon, "held-out") / "dry.jsonl").exists()


@pytest.mark.parametrize(("graders", "extra", "grader"), [
    ('{"type": "python", "name": "p", "source": "import os"}', {}, "grader"),
    ('{"type": "multi", "graders": {"a": {"type": "string_check", "operation": "eq", '
     '"input": "{{sample.output_text}}", "reference": "x"}}, "calculate_output": "a.real"}',
     {}, "grader"),
    (EVERY_KIND, {"judge_engine": "gpt-judge"}, None),  # no such engine in modelsmith.toml
    ('{"type": "string_check", "operation": "eq", "input": "{{sample.output_text}}", '
     '"reference": "{{item.nope}}"}', {}, "grader"),
    ("[" * 100_000, {}, None),
])
def test_a_hostile_import_is_a_typed_error_naming_the_grader_and_writes_nothing(
        daemon: DaemonProcess, graders: str, extra: dict[str, Any], grader: str | None) -> None:
    before = sorted(p.name for p in scenario_dir(daemon).glob("*")) if scenario_dir(
        daemon).exists() else []
    with pytest.raises(ValidationError) as caught:
        daemon.call("scenarios.import_graders", params("hostile", graders=graders) | extra)
    if grader is not None:
        assert caught.value.data["grader"] == grader
    after = sorted(p.name for p in scenario_dir(daemon).glob("*")) if scenario_dir(
        daemon).exists() else []
    assert after == before


def test_an_import_never_replaces_a_file_or_reuses_a_scenario_id(daemon: DaemonProcess) -> None:
    daemon.call("scenarios.import_graders", params("taken", set="held-out"))
    with pytest.raises(ConflictError):
        daemon.call("scenarios.import_graders", params("taken", set="held-out"))
    with pytest.raises(ConflictError) as caught:  # same ids from another set's file
        daemon.call("scenarios.import_graders", params("taken", set="core"))
    assert caught.value.data["ids"][:2] == ["taken-0001", "taken-0002"]
    assert not (scenario_dir(daemon) / "taken.jsonl").exists()


def test_the_cli_imports_a_grader_file_and_prints_json(daemon: DaemonProcess, tmp_path: Path
                                                       ) -> None:
    graders = tmp_path / "rfa.json"
    graders.write_text('{"type": "text_similarity", "name": "close", "evaluation_metric": '
                       '"rouge_l", "pass_threshold": 0.6, "input": "{{sample.output_text}}", '
                       '"reference": "{{item.answer}}"}')
    items = tmp_path / "items.jsonl"
    items.write_text('{"input": "Say it.", "answer": "the cat sat"}\n')
    done = subprocess.run(
        [sys.executable, "-m", "modelsmith.clients.cli", "scenarios", "import-graders",
         str(graders), "--cluster", "adtech", "--set", "held-out", "--items", str(items),
         "--socket", str(daemon.socket_path), "--json"],
        capture_output=True, text=True, timeout=60, env={**os.environ},
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["name"] == "rfa" and out["scenarios"] == 1
    assert out["mapping"] == [{"grader": "grader", "type": "text_similarity",
                               "criterion": "similarity", "note": "metric rouge_l"}]
    line = json.loads((scenario_dir(daemon, "held-out") / "rfa.jsonl").read_text())
    assert line["prompt"] == "Say it." and line["rubric"]["criteria"][0]["metric"] == "rouge_l"
    refused = subprocess.run(
        [sys.executable, "-m", "modelsmith.clients.cli", "scenarios", "import-graders",
         str(graders), "--cluster", "adtech", "--set", "held-out",
         "--socket", str(daemon.socket_path)], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2  # usage: --items is needed


def test_two_imports_racing_for_one_name_leave_one_file_and_one_conflict(
        daemon: DaemonProcess) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def attempt(_: int) -> str:
        try:
            daemon.call("scenarios.import_graders", params("raced", set="held-out"))
        except ConflictError:
            return "conflict"
        return "imported"

    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = sorted(pool.map(attempt, range(4)))
    assert outcomes == ["conflict"] * 3 + ["imported"]
    lines = (scenario_dir(daemon, "held-out") / "raced.jsonl").read_text().splitlines()
    assert len(lines) == 2


async def test_an_agent_imports_graders_through_the_mcp_tool(daemon: DaemonProcess) -> None:
    from clients.test_mcp import call, error_of, mcp_session, ok

    async with mcp_session(daemon.socket_path) as client:
        dry = ok(await call(client, "modelsmith_import_graders", {
            "cluster": "adtech", "set": "held-out", "name": "agent", "graders": EVERY_KIND,
            "items": ITEMS, "judge_engine": "cluster", "prompt": "{{item.question}}",
            "dry_run": True}))
        assert dry["dry_run"] and dry["scenarios"] == 2 and dry["files"] == []
        assert dry["mapping"][0] == {"grader": "testing_criteria[0]", "type": "string_check",
                                     "criterion": "exact"}
        refused = await call(client, "modelsmith_import_graders", {
            "cluster": "adtech", "set": "held-out", "name": "agent", "items": ITEMS,
            "graders": '{"type": "python", "name": "p", "source": "import os"}'})
        error = error_of(refused)
        assert error["code"] == ValidationError.code and error["data"]["grader"] == "grader"
    assert not (scenario_dir(daemon, "held-out") / "agent.jsonl").exists()
