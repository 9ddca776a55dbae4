"""The CLI against a real daemon: stable exit codes, JSON output, the seed's status layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.daemon_process import (
    BAD_CLUSTER_TOML,
    DaemonProcess,
    short_tmp_dir,
    start_daemon,
    write_cluster,
)

from modelsmith.clients.cli import main
from modelsmith.clients.common import ExitCode


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    with short_tmp_dir() as base:
        home = base / "home"
        write_cluster(home, "adtech")
        write_cluster(home, "broken", BAD_CLUSTER_TOML)
        with start_daemon(home, socket_path=base / "run" / "ms.sock") as process:
            yield process


def run_cli(daemon: DaemonProcess, *argv: str) -> int:
    return main([*argv, "--socket", str(daemon.socket_path)])


def test_ping_exits_0(daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(daemon, "ping") == ExitCode.OK
    assert str(daemon.socket_path) in capsys.readouterr().out


def test_no_command_is_a_usage_error_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == ExitCode.USAGE
    assert capsys.readouterr().err


def test_an_unknown_option_is_a_usage_error_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--no-such-option"]) == ExitCode.USAGE


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == ExitCode.OK
    assert "status" in capsys.readouterr().out


def test_no_daemon_at_the_socket_exits_3_and_names_the_socket(
    short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = short_tmp / "nobody-home.sock"
    assert main(["status", "--socket", str(missing)]) == ExitCode.UNREACHABLE
    assert str(missing) in capsys.readouterr().err


def test_the_socket_comes_from_modelsmith_socket_when_no_flag_is_given(
    daemon: DaemonProcess, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MODELSMITH_SOCKET", str(daemon.socket_path))
    assert main(["ping"]) == ExitCode.OK


def test_an_unknown_cluster_is_refused_with_exit_4(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(daemon, "status", "--cluster", "nope") == ExitCode.REFUSED
    assert "1001" in capsys.readouterr().err


def test_a_refusal_in_json_mode_prints_the_error_code_as_json(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(daemon, "status", "--cluster", "nope", "--json") == ExitCode.REFUSED
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["code"] == 1001
    assert error["name"] == "not_found"
    assert error["data"]["cluster"] == "nope"


def test_status_json_parses_and_carries_the_cluster_fields(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(daemon, "status", "--json") == ExitCode.OK
    status = json.loads(capsys.readouterr().out)
    (cluster,) = status["clusters"]
    assert cluster["cluster"] == "adtech"
    assert cluster["model"] == "tiny-llama"
    assert cluster["phase"] == "idle"
    assert cluster["iteration"] == 0
    assert cluster["composite"] is None
    assert cluster["composite_threshold"] == 0.8
    assert cluster["held_out_threshold"] == 0.75
    assert {"scenarios", "passed", "champion", "pending_promotion"} <= cluster.keys()
    assert [e["field"] for e in status["errors"]] == ["thresholds.composite"]


def test_status_shows_the_seeds_labels(daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(daemon, "status") == ExitCode.OK
    out = capsys.readouterr().out
    labels = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "adtech" in labels["cluster"]
    assert "tiny-llama" in labels["model"]
    assert labels["iteration"].split()[1] == "0"
    assert "idle" in labels["phase"]
    assert "threshold 0.800" in labels["composite"]
    assert "threshold 0.750" in labels["held_out"]
    assert "broken" in out  # the cluster that failed to load is reported, not hidden


def test_status_of_one_cluster_shows_only_that_cluster(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(daemon, "status", "--cluster", "adtech", "--json") == ExitCode.OK
    status = json.loads(capsys.readouterr().out)
    assert [c["cluster"] for c in status["clusters"]] == ["adtech"]


def test_daemon_status_prints_the_daemons_pid(daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(daemon, "daemon-status", "--json") == ExitCode.OK
    assert json.loads(capsys.readouterr().out)["pid"] == daemon.pid
    assert run_cli(daemon, "daemon-status") == ExitCode.OK
    assert str(daemon.pid) in capsys.readouterr().out


def test_jobs_lists_no_jobs_on_a_fresh_daemon(daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(daemon, "jobs", "--json") == ExitCode.OK
    assert json.loads(capsys.readouterr().out) == {"jobs": []}
    assert run_cli(daemon, "jobs") == ExitCode.OK


def test_cancelling_an_unknown_job_is_refused_with_exit_4(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(daemon, "cancel", "deadbeef") == ExitCode.REFUSED


def test_options_before_the_command_count_as_well(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--socket", str(daemon.socket_path), "--json", "ping"]) == ExitCode.OK
    assert json.loads(capsys.readouterr().out)["pong"] is True


def test_the_installed_entry_point_runs_as_its_own_process(daemon: DaemonProcess) -> None:
    env = {**os.environ, "MODELSMITH_SOCKET": str(daemon.socket_path)}
    ok = subprocess.run(
        [sys.executable, "-m", "modelsmith.clients.cli", "ping", "--json"],
        capture_output=True, text=True, env=env, timeout=30,
    )
    assert ok.returncode == ExitCode.OK, ok.stderr
    assert json.loads(ok.stdout)["pong"] is True
    env["MODELSMITH_SOCKET"] = str(daemon.socket_path) + ".missing"
    gone = subprocess.run(
        [sys.executable, "-m", "modelsmith.clients.cli", "ping"],
        capture_output=True, text=True, env=env, timeout=30,
    )
    assert gone.returncode == ExitCode.UNREACHABLE
    assert "Traceback" not in gone.stderr
