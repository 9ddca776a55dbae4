"""CLI command ``modelsmith mcp``: run the MCP server on stdio (the SDK is imported only here)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def cmd_mcp(args: argparse.Namespace) -> int:
    # Imported here, not at module level: the CLI's hot path never loads the mcp SDK.
    from modelsmith.clients.mcp_server import main

    return main(args.socket, call_timeout=args.timeout)


def register(sub: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    add("mcp", cmd_mcp, "run the MCP server on stdio (for Claude Code, Cursor, Codex)",
        description="Serve Modelsmith's tools over MCP on stdin/stdout. A stateless client of "
                    "the daemon's socket (--socket, else $MODELSMITH_SOCKET, ...).")
