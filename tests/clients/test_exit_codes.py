"""One exit-code table: the CLI's ExitCode, and the README's table that documents it."""

from __future__ import annotations

import re
from pathlib import Path

from modelsmith.clients import cli, commands_eval, commands_loop, commands_promote, commands_train
from modelsmith.clients.common import ExitCode

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_exit_codes() -> dict[int, str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("### Exit codes (stable)", 1)[1].split("\n#", 1)[0]
    return {int(code): meaning for code, meaning in re.findall(r"^\| (\d+) \| (.+) \|$", section, re.M)}


def test_the_readme_documents_exactly_the_codes_the_cli_returns() -> None:
    assert sorted(readme_exit_codes()) == sorted(code.value for code in ExitCode)


def test_the_codes_keep_their_documented_values() -> None:
    assert {code.name: code.value for code in ExitCode} == {
        "OK": 0, "GATE_FAILED": 1, "USAGE": 2, "UNREACHABLE": 3, "REFUSED": 4, "JOB_FAILED": 5,
        "INTERRUPTED": 130,
    }


def test_no_command_module_keeps_an_exit_code_table_of_its_own() -> None:
    for module in (cli, commands_eval, commands_loop, commands_promote, commands_train):
        assert not [name for name in vars(module) if name.startswith("EXIT_")], module.__name__
