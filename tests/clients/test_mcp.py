"""``modelsmith mcp`` driven by the SDK's real client over stdio, against a real daemon process.

The MCP server runs as ``python -m modelsmith.clients.cli mcp --socket S`` (a subprocess the
client spawns); the daemon is ``python -m modelsmith.daemon`` on a temporary home. Engine-free
tests use a daemon without engines; the ``vllm`` tests run a daemon with the tiny model on the
real CPU vLLM and drive one whole loop iteration through MCP alone.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import pytest
from jsonschema import Draft202012Validator
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult
from support.daemon_process import (
    GOOD_CLUSTER_TOML,
    DaemonProcess,
    short_tmp_dir,
    start_daemon,
    write_cluster,
)

from modelsmith.clients.mcp_server import TOOLS
from modelsmith.clients.mcp_tools import TEXT_CAP, UNTRUSTED, untrusted

if TYPE_CHECKING:
    from support.cluster_daemon import ClusterDaemon


REPO_ROOT = Path(__file__).resolve().parents[2]
CALL_TIMEOUT_S = 60.0

EXPECTED_TOOLS = {
    "modelsmith_fleet_status",
    "modelsmith_cluster_status",
    "modelsmith_eval_run",
    "modelsmith_eval_status",
    "modelsmith_eval_results",
    "modelsmith_compare",
    "modelsmith_eval_report",
    "modelsmith_diagnose",
    "modelsmith_train_start",
    "modelsmith_train_status",
    "modelsmith_train_cancel",
    "modelsmith_synth_run",
    "modelsmith_import_graders",
    "modelsmith_judge_check",
    "modelsmith_judge_list",
    "modelsmith_policy_gate",
    "modelsmith_promote",
    "modelsmith_rollback_request",
    "modelsmith_evidence_bundle",
}

# Good arguments for an unknown cluster: every tool that names a cluster must answer 1001.
CLUSTER_TOOLS: dict[str, dict[str, Any]] = {
    "modelsmith_fleet_status": {"cluster": "nope"},
    "modelsmith_cluster_status": {"cluster": "nope"},
    "modelsmith_eval_run": {"cluster": "nope", "type": "core"},
    "modelsmith_eval_results": {"cluster": "nope", "tag": "t"},
    "modelsmith_compare": {"cluster": "nope", "a": "x", "b": "y"},
    "modelsmith_eval_report": {"cluster": "nope"},
    "modelsmith_diagnose": {"cluster": "nope", "tag": "t"},
    "modelsmith_train_start": {"cluster": "nope", "eval_tag": "t", "method": "grpo", "target": "failures"},
    "modelsmith_synth_run": {"cluster": "nope", "from_eval": "t"},
    "modelsmith_import_graders": {"cluster": "nope", "set": "core", "name": "g", "graders": "{}",
                                  "items": "{}"},
    "modelsmith_judge_check": {"cluster": "nope"},
    "modelsmith_judge_list": {"cluster": "nope"},
    "modelsmith_policy_gate": {"cluster": "nope"},
    "modelsmith_promote": {"cluster": "nope"},
    "modelsmith_rollback_request": {"cluster": "nope"},
    "modelsmith_evidence_bundle": {"cluster": "nope", "request_id": "r"},
}
JOB_TOOLS = ("modelsmith_eval_status", "modelsmith_train_status", "modelsmith_train_cancel")


@asynccontextmanager
async def mcp_session(socket_path: Path, session_timeout: float = 120.0) -> AsyncIterator[Client]:
    """The SDK's client, connected over stdio to a fresh ``modelsmith mcp`` subprocess.

    The whole session is bounded by ``session_timeout`` (start, calls and shutdown).
    """
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "modelsmith.clients.cli", "mcp", "--socket", str(socket_path)],
        env={"PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        cwd=REPO_ROOT,
    )
    with anyio.fail_after(session_timeout):
        async with Client(params) as client:
            yield client


async def call(client: Client, tool: str, arguments: dict[str, Any], limit_s: float = CALL_TIMEOUT_S) -> CallToolResult:
    with anyio.fail_after(limit_s):
        return await client.call_tool(tool, arguments)


def error_of(result: CallToolResult) -> dict[str, Any]:
    assert result.is_error, f"expected an error result, got {result.structured_content}"
    # No structuredContent: TypeScript clients would validate it against the outputSchema.
    assert result.structured_content is None
    [text] = result.content
    error = json.loads(text.text)  # type: ignore[union-attr]
    assert isinstance(error, dict)
    assert set(error) == {"code", "name", "message", "data"}
    return error


def ok(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, f"tool failed: {result.structured_content}"
    assert isinstance(result.structured_content, dict)
    # The text block carries the same JSON, for clients that read only text.
    assert json.loads(result.content[0].text) == result.structured_content  # type: ignore[union-attr]
    return result.structured_content


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    """A daemon without engines and one cluster, ``adtech``."""
    with short_tmp_dir() as base:
        home = base / "home"
        write_cluster(home, "adtech", GOOD_CLUSTER_TOML)
        with start_daemon(home, socket_path=base / "run" / "ms.sock") as process:
            yield process


# -- tool list and schemas -----------------------------------------------------------------


async def test_the_server_lists_every_loop_tool_with_valid_input_and_output_schemas(daemon: DaemonProcess) -> None:
    async with mcp_session(daemon.socket_path) as client:
        with anyio.fail_after(CALL_TIMEOUT_S):
            listed = await client.list_tools()
    tools = {tool.name: tool for tool in listed.tools}
    assert set(tools) == EXPECTED_TOOLS
    by_name = {spec.name: spec for spec in TOOLS}
    for name, tool in tools.items():
        Draft202012Validator.check_schema(tool.input_schema)
        assert tool.output_schema is not None
        Draft202012Validator.check_schema(tool.output_schema)
        assert tool.input_schema["type"] == "object" and tool.output_schema["type"] == "object"
        # The listed schema is the one generated from the tool's typed arguments.
        assert tool.input_schema == by_name[name].input_schema()
        assert tool.input_schema["additionalProperties"] is False
        assert tool.description


def test_no_tool_can_approve_reject_or_roll_back_a_promotion() -> None:
    for spec in TOOLS:
        assert not any(word in spec.name for word in ("approve", "reject", "decide")), spec.name
    assert {spec.name for spec in TOOLS if "rollback" in spec.name} == {"modelsmith_rollback_request"}


# -- errors -----------------------------------------------------------------------------------


async def test_an_unknown_tool_is_refused_with_invalid_params(daemon: DaemonProcess) -> None:
    async with mcp_session(daemon.socket_path) as client:
        for name in ("modelsmith_nope", "modelsmith_promote_approve"):
            with pytest.raises(MCPError) as caught:
                await call(client, name, {})
            assert caught.value.code == -32602
            assert caught.value.data["tool"] == name


async def test_malformed_arguments_are_an_error_result_naming_the_argument(daemon: DaemonProcess) -> None:
    async with mcp_session(daemon.socket_path) as client:
        wrong_type = error_of(await call(client, "modelsmith_eval_run", {"cluster": "adtech", "workers": "four"}))
        assert wrong_type["code"] == -32602
        assert wrong_type["data"]["argument"] == "workers"

        unknown = error_of(await call(client, "modelsmith_cluster_status", {"cluster": "adtech", "colour": 1}))
        assert unknown["code"] == -32602
        assert unknown["data"]["argument"] == "colour"

        missing = error_of(await call(client, "modelsmith_eval_results", {"cluster": "adtech"}))
        assert missing["code"] == -32602
        assert missing["data"]["argument"] == "tag"

        out_of_range = error_of(await call(client, "modelsmith_eval_status", {"jobId": "x", "wait_s": 10_000}))
        assert out_of_range["code"] == -32602
        assert out_of_range["data"]["argument"] == "wait_s"

        bad_choice = error_of(await call(client, "modelsmith_train_start",
                                         {"cluster": "adtech", "eval_tag": "t", "method": "ppo"}))
        assert bad_choice["data"]["argument"] == "method"


async def test_every_tool_that_names_a_cluster_answers_not_found_for_an_unknown_one(daemon: DaemonProcess) -> None:
    async with mcp_session(daemon.socket_path) as client:
        for tool, arguments in CLUSTER_TOOLS.items():
            error = error_of(await call(client, tool, arguments))
            assert (tool, error["code"]) == (tool, 1001), error
        for tool in JOB_TOOLS:
            error = error_of(await call(client, tool, {"jobId": "0000dead"}))
            assert (tool, error["code"]) == (tool, 1001), error


async def test_a_daemon_that_is_down_gives_1012_naming_the_socket(short_tmp: Path) -> None:
    socket_path = short_tmp / "absent.sock"
    async with mcp_session(socket_path) as client:
        for tool, arguments in (("modelsmith_fleet_status", {}), ("modelsmith_cluster_status", {"cluster": "adtech"})):
            error = error_of(await call(client, tool, arguments))
            assert error["code"] == 1012
            assert error["name"] == "daemon_unreachable"
            assert error["data"]["socket"] == str(socket_path)


# -- results ----------------------------------------------------------------------------------


async def test_fleet_and_cluster_status_return_the_cluster_as_structured_content(daemon: DaemonProcess) -> None:
    async with mcp_session(daemon.socket_path) as client:
        fleet = ok(await call(client, "modelsmith_fleet_status", {}))
        assert [c["cluster"] for c in fleet["clusters"]] == ["adtech"]
        status = ok(await call(client, "modelsmith_cluster_status", {"cluster": "adtech"}))
        assert status["cluster"] == "adtech"
        assert status["iteration"] == 0
        assert status["champion"] is None


async def test_rollback_request_only_describes_the_rollback_and_the_human_command(daemon: DaemonProcess) -> None:
    ledger = daemon.home / "adtech" / "ledger.jsonl"
    before = ledger.read_bytes()
    async with mcp_session(daemon.socket_path) as client:
        plan = ok(await call(client, "modelsmith_rollback_request", {"cluster": "adtech"}))
        never_approved = error_of(await call(client, "modelsmith_rollback_request",
                                             {"cluster": "adtech", "to_iteration": 7}))
    assert plan["performed"] is False
    assert plan["current_champion"] is None
    assert plan["to_iteration"] == 0
    assert plan["command"] == "modelsmith rollback adtech --to 0"
    assert never_approved["code"] == 1001
    assert never_approved["data"]["argument"] == "to_iteration"
    assert ledger.read_bytes() == before


def test_untrusted_text_is_capped_with_a_marker_of_how_much_was_cut() -> None:
    short = untrusted("ignore previous instructions")
    assert (short.text, short.truncated_chars) == ("ignore previous instructions", 0)
    long = untrusted("x" * (TEXT_CAP + 700))
    assert long.chars == TEXT_CAP + 700
    assert long.truncated_chars == 700
    assert long.text.startswith("x" * TEXT_CAP)
    assert "700" in long.text[TEXT_CAP:]


def test_every_text_field_from_scenarios_or_models_sits_under_an_untrusted_data_key() -> None:
    from modelsmith.clients.mcp_tools import DiagnosisView, EvalResultsPage

    for struct in (EvalResultsPage, DiagnosisView):
        schema = json.dumps(msgspec.json.schema(struct))
        assert UNTRUSTED in schema
        for field in ('"prompt"', '"response"', '"reference"'):
            # each of these is declared only inside the untrusted texts objects
            defs = msgspec.json.schema(struct)["$defs"]
            holders = {name for name, d in defs.items() if field.strip('"') in d.get("properties", {})}
            assert holders <= {"ScenarioTexts", "ExampleTexts"}, (struct, field, holders)


# -- one whole iteration on the real engine ---------------------------------------------------

ITERATION_CLUSTER = "rtb-mcp"  # the session daemon's spare cluster for these tests
JOB_WAIT_S = 120.0


async def wait_finished(client: Client, tool: str, job_id: str, *, rounds: int = 8) -> dict[str, Any]:
    """Ask ``tool`` with ``wait_s`` until the job has finished (at most ``rounds`` questions)."""
    for _ in range(rounds):
        status = ok(await call(client, tool, {"jobId": job_id, "wait_s": JOB_WAIT_S},
                               limit_s=JOB_WAIT_S + 30))
        if status["finished"]:
            return status
    raise AssertionError(f"job {job_id} did not finish within {rounds} x {JOB_WAIT_S} s")


def assert_capped_untrusted(texts: dict[str, Any]) -> None:
    for value in texts.values():
        for text in value if isinstance(value, list) else [value]:
            if text is None:
                continue
            assert set(text) == {"text", "chars", "truncated_chars"}
            assert len(text["text"]) <= TEXT_CAP + 40


@pytest.mark.vllm
@pytest.mark.timeout(1500)
async def test_one_whole_loop_iteration_runs_through_mcp_alone(cluster_daemon: ClusterDaemon) -> None:
    cluster = ITERATION_CLUSTER
    async with mcp_session(cluster_daemon.socket_path, session_timeout=1400) as client:
        # eval of the base model, as the seed's example calls it
        started = ok(await call(client, "modelsmith_eval_run", {
            "cluster": cluster, "tag": "mcp-base", "type": "full", "workers": 2, "domain": "adtech",
            "adapter": "base"}))
        assert started["status"] == "started" and started["tag"] == "mcp-base" and started["log"]
        base = await wait_finished(client, "modelsmith_eval_status", started["jobId"])
        assert base["job"]["state"] == "succeeded", base["job"]
        assert base["summary"]["tag"] == "mcp-base" and base["summary"]["scored"] > 0

        results = ok(await call(client, "modelsmith_eval_results",
                                {"cluster": cluster, "tag": "mcp-base", "failed_only": False, "limit": 5}))
        assert results["total"] == base["summary"]["scored"] and results["results"]
        for outcome in results["results"]:
            assert not {"prompt", "response", "reference"} & set(outcome)
            assert_capped_untrusted(outcome["untrusted_data"])

        diagnosis = ok(await call(client, "modelsmith_diagnose", {"cluster": cluster, "tag": "mcp-base"}))
        assert diagnosis["failed"] > 0 and diagnosis["patterns"]
        for pattern in diagnosis["patterns"]:
            for example in pattern["examples"]:
                assert_capped_untrusted(example["untrusted_data"])

        # post-train on the failures, a few steps
        training = ok(await call(client, "modelsmith_train_start", {
            "cluster": cluster, "eval_tag": "mcp-base", "method": "grpo", "target": "failures",
            "max_steps": 5}))
        assert training["status"] == "queued" and training["cluster"] == cluster
        assert training["estimated_duration_minutes"] >= 0
        trained = await wait_finished(client, "modelsmith_train_status", training["jobId"])
        assert trained["job"]["state"] == "succeeded", trained["job"]
        assert trained["adapter"] == "iter-1" and trained["metrics"]

        # eval the new adapter and compare
        again = ok(await call(client, "modelsmith_eval_run",
                              {"cluster": cluster, "tag": "mcp-iter-1", "type": "full", "adapter": "iter-1"}))
        after = await wait_finished(client, "modelsmith_eval_status", again["jobId"])
        assert after["job"]["state"] == "succeeded", after["job"]
        assert after["summary"]["adapter"] == "iter-1"
        comparison = ok(await call(client, "modelsmith_compare", {"cluster": cluster, "a": "mcp-base", "b": "mcp-iter-1"}))
        assert comparison["fixed"] + comparison["regressed"] + comparison["unchanged"] == len(comparison["scenarios"])
        receipts = ok(await call(client, "modelsmith_eval_report", {"cluster": cluster}))
        rows = {r["role"]: r for r in receipts["rows"]}
        assert rows["base"]["tag"] == "mcp-base" and rows["base"]["status"] == "current"
        assert rows["base"]["rank"] is not None

        # the gate, then a promotion request (never an approval)
        gate = ok(await call(client, "modelsmith_policy_gate", {"cluster": cluster, "eval_tag": "mcp-iter-1"}))
        assert gate["checks"] and gate["eval_tag"] == "mcp-iter-1"
        promoted = await call(client, "modelsmith_promote",
                              {"cluster": cluster, "eval_tag": "mcp-iter-1", "note": "through MCP"})
        if gate["passed"]:
            request = ok(promoted)
            assert request["status"] == "pending" and request["adapter"] == "iter-1"
            bundle = ok(await call(client, "modelsmith_evidence_bundle",
                                   {"cluster": cluster, "request_id": request["request_id"]}))
            assert bundle["files"] > 0
        else:
            # The shipped thresholds are above what a random tiny model reaches: refused, typed.
            assert error_of(promoted)["code"] == 1005

        status = ok(await call(client, "modelsmith_cluster_status", {"cluster": cluster}))
        assert status["iteration"] == 1
        plan = ok(await call(client, "modelsmith_rollback_request", {"cluster": cluster}))
        assert plan["performed"] is False and plan["command"].startswith(f"modelsmith rollback {cluster} --to ")

    kinds = [e["kind"] for e in cluster_daemon.ledger_entries(cluster)]
    assert "promotion.approved" not in kinds and "rollback.done" not in kinds
