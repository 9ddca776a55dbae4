"""``modelsmith mcp`` driven by the official MCP Inspector CLI (TypeScript SDK), against a real daemon.

The Inspector is pinned in ``tools/mcp-inspector/package-lock.json`` and installed there by
``make setup`` (``npm ci``). Like Claude Code and Cursor, it validates ``structuredContent``
against the tool's ``outputSchema`` even on ``isError`` results, so these tests check that
typed errors reach such a client with their code intact.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.daemon_process import DaemonProcess, short_tmp_dir, start_daemon, write_cluster

from modelsmith.clients.mcp_server import TOOLS

REPO_ROOT = Path(__file__).resolve().parents[2]
INSPECTOR_DIR = REPO_ROOT / "tools" / "mcp-inspector"
INSPECTOR_TIMEOUT_S = 120.0

pytestmark = pytest.mark.skipif(shutil.which("npx") is None, reason="Node.js (npx) is not installed")


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    """A daemon without engines and one cluster, ``adtech``."""
    with short_tmp_dir() as base:
        write_cluster(base / "home", "adtech")
        with start_daemon(base / "home", socket_path=base / "run" / "ms.sock") as process:
            yield process


def modelsmith_command() -> list[str]:
    """How the Inspector starts the server: the venv's ``modelsmith`` script, as an agent would."""
    script = Path(sys.executable).with_name("modelsmith")
    return [str(script)] if script.exists() else [sys.executable, "-m", "modelsmith.clients.cli"]


def inspect(socket_path: Path, *method_args: str) -> dict[str, Any]:
    """Run ``mcp-inspector --cli modelsmith mcp --socket S ...``; its stdout is the result JSON."""
    if not (INSPECTOR_DIR / "node_modules" / ".bin" / "mcp-inspector").exists():
        pytest.fail(f"the MCP Inspector is not installed in {INSPECTOR_DIR}: run `make setup`")
    run = subprocess.run(
        ["npx", "--no-install", "--prefix", str(INSPECTOR_DIR), "mcp-inspector", "--cli",
         *modelsmith_command(), "mcp", "--socket", str(socket_path), *method_args],
        capture_output=True, text=True, timeout=INSPECTOR_TIMEOUT_S, cwd=INSPECTOR_DIR,
    )
    assert run.returncode == 0, f"inspector exited {run.returncode}\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}"
    result = json.loads(run.stdout)
    assert isinstance(result, dict)
    return result


def call_tool(socket_path: Path, tool: str, **arguments: str) -> dict[str, Any]:
    tool_args = [f"{key}={value}" for key, value in arguments.items()]
    return inspect(socket_path, "--method", "tools/call", "--tool-name", tool,
                   *(["--tool-arg", *tool_args] if tool_args else []))


def error_of(result: dict[str, Any]) -> dict[str, Any]:
    """The typed envelope of an error result, as the Inspector printed it."""
    assert result.get("isError") is True, result
    assert "structuredContent" not in result
    [content] = result["content"]
    assert content["type"] == "text"
    error = json.loads(content["text"])
    assert isinstance(error, dict) and set(error) == {"code", "name", "message", "data"}
    return error


def test_the_inspector_lists_every_tool_with_its_schemas(daemon: DaemonProcess) -> None:
    listed = inspect(daemon.socket_path, "--method", "tools/list")
    tools = {tool["name"]: tool for tool in listed["tools"]}
    assert set(tools) == {spec.name for spec in TOOLS}
    assert all(tool["inputSchema"]["type"] == "object" and tool["outputSchema"] for tool in tools.values())


def test_a_good_call_passes_the_inspectors_output_schema_check(daemon: DaemonProcess) -> None:
    result = call_tool(daemon.socket_path, "modelsmith_fleet_status")
    assert result.get("isError") is not True, result
    assert [c["cluster"] for c in result["structuredContent"]["clusters"]] == ["adtech"]
    assert json.loads(result["content"][0]["text"]) == result["structuredContent"]


def test_an_unknown_cluster_reaches_the_inspector_as_not_found(daemon: DaemonProcess) -> None:
    error = error_of(call_tool(daemon.socket_path, "modelsmith_cluster_status", cluster="nope"))
    assert (error["code"], error["name"]) == (1001, "not_found")


def test_a_bad_argument_reaches_the_inspector_as_invalid_params_naming_it(daemon: DaemonProcess) -> None:
    error = error_of(call_tool(daemon.socket_path, "modelsmith_cluster_status", cluster="adtech", colour="red"))
    assert error["code"] == -32602
    assert error["data"]["argument"] == "colour"


def test_a_daemon_that_is_down_reaches_the_inspector_as_1012_naming_the_socket(short_tmp: Path) -> None:
    socket_path = short_tmp / "absent.sock"
    error = error_of(call_tool(socket_path, "modelsmith_fleet_status"))
    assert (error["code"], error["name"]) == (1012, "daemon_unreachable")
    assert error["data"]["socket"] == str(socket_path)
