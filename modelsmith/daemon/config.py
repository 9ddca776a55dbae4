"""The daemon's own configuration: ``<home>/modelsmith.toml`` (optional) or ``--config PATH``.

Every field is documented once, here; ``modelsmith config schema`` prints the JSON schema.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from modelsmith.errors import ValidationError
from modelsmith.tomlfile import load_toml_model

CONFIG_FILE = "modelsmith.toml"


class DaemonConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    socket: str | None = Field(default=None, description="Socket path; overridden by --socket "
                               "and MODELSMITH_SOCKET, ignored under socket activation.")
    socket_group: str | None = Field(default=None, description="Group that owns the socket "
                                     "(mode 0660) and its directory (0750).")
    allowed_groups: list[str] = Field(default_factory=list, description="Groups whose members "
                                      "may connect, besides the daemon's own user and root.")
    max_frame_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, description="Largest RPC "
                                 "frame accepted; a larger one closes the connection.")
    read_timeout_s: float = Field(default=30.0, gt=0, description="A frame's body must arrive "
                                  "within this.")
    idle_timeout_s: float = Field(default=300.0, gt=0, description="Connections with nothing in "
                                  "flight are closed after this.")
    max_inflight_per_connection: int = Field(default=64, ge=1, description="Concurrent requests "
                                             "on one connection.")
    max_connections: int = Field(default=1024, ge=1, description="Connections served at once "
                                 "(lowered at start to leave a quarter of RLIMIT_NOFILE, at least "
                                 "64 descriptors, to the daemon); one more gets a 1011 error "
                                 "naming the limit and is closed.")
    max_connections_per_uid: int = Field(default=256, ge=1, description="Connections served at "
                                         "once for one peer uid; one more gets a 1011 error "
                                         "naming the limit and is closed.")
    shutdown_grace_s: float = Field(default=20.0, gt=0, description="On SIGTERM, running work "
                                    "gets this long to stop before it is cancelled.")
    log_format: Literal["auto", "json", "console"] = Field(default="auto", description="auto: "
                                                           "readable on a terminal, JSON lines "
                                                           "otherwise.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info",
                                                                    description="Log level.")
    start_engines: bool = Field(default=True, description="Start each cluster's engine at "
                                "startup and keep it warm.")


def load_daemon_config(path: Path | None, home: Path) -> DaemonConfig:
    """Load the config (explicit path, else ``<home>/modelsmith.toml``, else defaults)."""
    explicit = path is not None
    path = path or home / CONFIG_FILE
    if not path.exists():
        if explicit:
            raise ValidationError(f"{path}: no such config file", data={"file": str(path), "field": None})
        return DaemonConfig()
    return load_toml_model(path, DaemonConfig)
