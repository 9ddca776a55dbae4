"""Where the daemon's socket is: one rule shared by the daemon, the CLI and the MCP server.

Order: an explicit ``--socket`` path, then ``$MODELSMITH_SOCKET``, then
``$XDG_RUNTIME_DIR/modelsmith/modelsmith.sock``, then ``/tmp/modelsmith-<uid>/modelsmith.sock``.
(Under systemd the unit sets ``MODELSMITH_SOCKET=/run/modelsmith/modelsmith.sock``.)
"""

from __future__ import annotations

import os
from pathlib import Path

SOCKET_ENV = "MODELSMITH_SOCKET"
HOME_ENV = "MODELSMITH_HOME"


def resolve_socket_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get(SOCKET_ENV)
    if env:
        return Path(env)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "modelsmith" / "modelsmith.sock"
    return Path(f"/tmp/modelsmith-{os.getuid()}") / "modelsmith.sock"


def resolve_home(explicit: str | os.PathLike[str] | None = None) -> Path:
    if explicit:
        return Path(explicit).absolute()
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).absolute()
    return Path(".iterate").absolute()
