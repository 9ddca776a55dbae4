"""What every CLI command shares: the daemon call, JSON output, the exit-code table, errors.

``cli.py`` and every ``commands_*.py`` import this module; none of them imports another
command module. Standard library, msgspec and the RPC client only: the CLI's hot path.
"""

from __future__ import annotations

import argparse
import json
import sys
from enum import IntEnum
from typing import Any, TypeVar

import msgspec

from modelsmith.errors import DaemonUnreachable, InvalidParams, ModelsmithError, error_envelope
from modelsmith.rpc.client import RpcClient

__all__ = ["ExitCode", "UsageError", "call", "client", "emit_error_json", "emit_json", "report_error"]

T = TypeVar("T")


class ExitCode(IntEnum):
    """The CLI's exit codes: stable, and the table in the README's "Exit codes" section."""

    OK = 0  # ok; for eval and policy check: the gate passed
    GATE_FAILED = 1  # the gate failed (eval, policy check), or ledger/bundle verify found a problem
    USAGE = 2  # usage error
    UNREACHABLE = 3  # the daemon is unreachable (the message names the socket)
    REFUSED = 4  # refused by the daemon (its error's name and code are printed)
    JOB_FAILED = 5  # the job failed or was cancelled
    INTERRUPTED = 130  # interrupted (Ctrl-C)


class UsageError(InvalidParams):
    """A command line the parser or a command refuses: exit code 2; ``invalid_params`` in JSON.

    ``data["usage"]`` is the command's usage line, when the parser knows it.
    """


def client(args: argparse.Namespace) -> RpcClient:
    """A blocking client for the socket and per-call timeout the user chose."""
    return RpcClient(args.socket, timeout=args.timeout)


def call(args: argparse.Namespace, method: str, params: dict[str, Any], result_type: type[T]) -> T:
    """Call ``method`` on a fresh connection; the result decoded as its wire Struct."""
    with client(args) as rpc:
        return rpc.call(method, params, result_type=result_type)


def emit_json(value: Any) -> None:
    """Print ``value`` (Structs included) as indented JSON on stdout."""
    sys.stdout.write(json.dumps(msgspec.to_builtins(value), indent=2, sort_keys=False) + "\n")


def emit_error_json(exc: BaseException) -> None:
    """Print ``{"error": <the one error envelope>}`` on stdout (``--json`` mode)."""
    emit_json({"error": error_envelope(exc)})


def report_error(exc: ModelsmithError, *, as_json: bool) -> ExitCode:
    """Tell the user why a command failed; the exit code that says so.

    With ``--json`` every failure prints ``{"error": envelope}`` on stdout as well; the message
    for people always goes to stderr.
    """
    if as_json:
        emit_error_json(exc)
    if isinstance(exc, UsageError):
        usage = exc.data.get("usage")
        if usage and not as_json:
            print(usage, file=sys.stderr)
        print(f"modelsmith: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    if isinstance(exc, DaemonUnreachable):
        print(f"modelsmith: {exc}", file=sys.stderr)
        return ExitCode.UNREACHABLE
    print(f"modelsmith: {exc} [{exc.name} {exc.code}]", file=sys.stderr)
    return ExitCode.REFUSED
