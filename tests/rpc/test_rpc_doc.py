"""docs/rpc.md documents every method the daemon registers, and every error code."""

from __future__ import annotations

import re
from pathlib import Path

from modelsmith import errors
from modelsmith.daemon.app import Daemon
from modelsmith.daemon.config import DaemonConfig

RPC_DOC = Path(__file__).resolve().parents[2] / "docs" / "rpc.md"


def registered_methods(home: Path) -> list[str]:
    daemon = Daemon(home=home, socket_path=home / "unused.sock", config=DaemonConfig())
    daemon._register()
    return daemon.table.names()


def test_every_registered_method_has_a_row_in_the_rpc_reference(tmp_path: Path) -> None:
    documented = set(re.findall(r"^\| `([a-z_]+\.[a-z_.]+)`", RPC_DOC.read_text(encoding="utf-8"), re.M))
    methods = registered_methods(tmp_path)
    assert "daemon.ping" in methods
    assert sorted(set(methods) - documented) == []


def test_every_error_code_is_in_the_rpc_reference() -> None:
    text = RPC_DOC.read_text(encoding="utf-8")
    for cls in (getattr(errors, name) for name in dir(errors)):
        if isinstance(cls, type) and issubclass(cls, errors.ModelsmithError):
            if cls in (errors.ModelsmithError, errors.ProtocolError):
                continue
            assert re.search(rf"^\|\s*{cls.code}\s*\|\s*`{cls.name}`", text, re.M), cls.__name__
