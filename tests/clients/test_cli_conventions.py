"""The CLI as people and agents expect it: --version, help on every argument, an error envelope
for every failure under --json, and shell completion generated from the parser."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelsmith import __version__
from modelsmith.clients.cli import build_parser, main
from modelsmith.clients.common import ExitCode


def parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every subcommand parser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from parsers(sub)


def test_version_prints_the_package_version_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == ExitCode.OK
    assert capsys.readouterr().out == f"modelsmith {__version__}\n"


def test_every_option_and_argument_of_every_command_has_help() -> None:
    missing = [
        f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
        for parser in parsers(build_parser())
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction)
        and action.help != argparse.SUPPRESS and not (action.help or "").strip()
    ]
    assert missing == []
    assert len(list(parsers(build_parser()))) > 20  # the walk reached the subcommands


def test_an_unreachable_daemon_in_json_mode_prints_the_envelope_and_exits_3(
    short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = short_tmp / "nobody-home.sock"
    assert main(["status", "--json", "--socket", str(missing)]) == ExitCode.UNREACHABLE
    error = json.loads(capsys.readouterr().out)["error"]
    assert (error["code"], error["name"]) == (1012, "daemon_unreachable")
    assert error["data"]["socket"] == str(missing)


@pytest.mark.parametrize("argv", [
    ["--json", "status", "--no-such-option"],
    ["eval", "--json"],  # --cluster is required
    ["train", "start", "--json"],  # refused by the command, not the parser
    ["--json", "no-such-command"],
])
def test_a_usage_error_in_json_mode_prints_the_envelope_and_exits_2(
    argv: list[str], short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--socket", str(short_tmp / "unused.sock")]) == ExitCode.USAGE
    error = json.loads(capsys.readouterr().out)["error"]
    assert (error["code"], error["name"]) == (-32602, "invalid_params")
    assert error["message"]


def test_a_usage_error_without_json_prints_nothing_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--no-such-option"]) == ExitCode.USAGE
    out, err = capsys.readouterr()
    assert out == "" and "usage:" in err and "--no-such-option" in err


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_the_bash_completion_script_is_valid_bash_and_knows_the_commands() -> None:
    run = subprocess.run([sys.executable, "-m", "modelsmith.clients.cli", "completion", "bash"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    for word in ("modelsmith", "eval", "promote", "--cluster"):
        assert word in run.stdout
    syntax = subprocess.run(["bash", "-n"], input=run.stdout, capture_output=True, text=True, timeout=60)
    assert syntax.returncode == 0, syntax.stderr


def test_the_zsh_completion_script_is_a_compdef_for_modelsmith(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["completion", "zsh"]) == ExitCode.OK
    script = capsys.readouterr().out
    assert script.startswith("#compdef modelsmith")
    assert "eval" in script and "--cluster" in script
