"""The CLI's hot path stays on the standard library and the RPC client: it must start fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from support.daemon_process import DaemonProcess, short_tmp_dir, start_daemon, write_cluster

HEAVY = {"torch", "vllm", "transformers", "pydantic", "structlog", "mcp", "trl", "peft"}


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    with short_tmp_dir() as base:
        write_cluster(base / "home", "adtech")
        with start_daemon(base / "home", socket_path=base / "run" / "ms.sock") as process:
            yield process


def imported_modules(importtime_stderr: str) -> set[str]:
    """Module names from ``-X importtime`` lines: ``import time: self | cumulative | name``."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                names.add(name)
    return names


def test_status_json_imports_none_of_the_heavy_libraries(daemon: DaemonProcess) -> None:
    env = {**os.environ, "MODELSMITH_SOCKET": str(daemon.socket_path)}
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "modelsmith.clients.cli", "status", "--json"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout)["clusters"][0]["cluster"] == "adtech"
    modules = imported_modules(run.stderr)
    assert "modelsmith.rpc.client" in modules  # the parse found the import lines at all
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert heavy == []
