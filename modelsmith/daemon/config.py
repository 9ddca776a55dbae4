"""The daemon's own configuration: ``<home>/modelsmith.toml`` (optional) or ``--config PATH``.

Every field is documented once, here; ``modelsmith config schema`` prints the JSON schema.
The named engines' fields (``[engines.NAME]``) are tabled in docs/engines.md by
:func:`engines_reference`.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from modelsmith.errors import ValidationError
from modelsmith.gpu.ray_config import RaySection
from modelsmith.tomlfile import load_toml_model

CONFIG_FILE = "modelsmith.toml"

# The rule for cluster names (modelsmith/loop/cluster/config.py), so both read alike anywhere.
ENGINE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
_ENGINE_KINDS = ("vllm", "openai")


class _EngineSection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    usd_per_mtok_in: float | None = Field(default=None, ge=0, description="Price in USD per "
                                          "million prompt tokens (for cost per 1,000 scenarios).")
    usd_per_mtok_out: float | None = Field(default=None, ge=0, description="Price in USD per "
                                           "million completion tokens.")


class VllmNamedEngine(_EngineSection):
    """A local model served in-process by vLLM, started by the engine pool like cluster engines
    (one warm engine per base model, shared with the clusters on it)."""

    kind: Literal["vllm"] = Field(description='"vllm": a local model directory.')
    model: str = Field(min_length=1, description="Local directory of the model (Hugging Face "
                       "layout); a relative path is resolved against the home directory.")
    dtype: str = Field(default="auto", description="Weights dtype.")
    max_model_len: int = Field(default=1024, ge=16, description="Context length the engine "
                               "allots.")
    gpu_memory_utilization: float = Field(default=0.85, gt=0, le=1, description="vLLM's share "
                                          "of GPU memory.")
    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs the engine spans.")


class OpenAINamedEngine(_EngineSection):
    """An OpenAI-compatible HTTP server or hosted API, by model name."""

    kind: Literal["openai"] = Field(description='"openai": an OpenAI-compatible HTTP API.')
    url: str = Field(pattern=r"^https?://", description="Base URL of the server (its root or "
                     "its `/v1` URL).")
    model: str = Field(min_length=1, description="Model name sent as `model`: a hosted API's "
                       "model id or vLLM's --served-model-name.")
    api_key_env: str | None = Field(default=None, pattern=_ENV_NAME, description="Name of the "
                                    "environment variable holding the API key, read at each "
                                    "request (the key itself never goes in a file).")
    max_concurrency: int = Field(default=16, ge=1, description="Requests in flight at once.")
    timeout_s: float = Field(default=300.0, gt=0, description="Bound on one request (one "
                             "attempt).")
    max_retries: int = Field(default=4, ge=0, description="Retries after HTTP 429, 5xx or a "
                             "failure to connect, with exponential backoff and jitter, "
                             "honouring Retry-After.")
    retry_max_delay_s: float = Field(default=60.0, gt=0, description="Longest wait before a "
                                     "retry (caps backoff and Retry-After).")


NamedEngineConfig = Annotated[VllmNamedEngine | OpenAINamedEngine, Field(discriminator="kind")]
"""One ``[engines.NAME]`` section, by its ``kind``."""


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
    ray: RaySection = Field(default_factory=RaySection, description="Engines and trainers on "
                            "a Ray cluster (off unless `address` is set): docs/scale.md.")
    engines: dict[str, NamedEngineConfig] = Field(
        default_factory=dict, description="Named engines, `[engines.NAME]` with `kind = "
        "\"vllm\"` or `\"openai\"`, for comparison evals and judges; names follow the cluster "
        "name rule. Fields: docs/engines.md.")

    @field_validator("engines")
    @classmethod
    def _engine_names(cls, engines: dict[str, NamedEngineConfig]) -> dict[str, NamedEngineConfig]:
        for name in engines:
            if not ENGINE_NAME.match(name):
                raise ValueError(f"engine name {name!r} must be lowercase letters, digits, '.', "
                                 "'_' or '-' (at most 63, starting with a letter or digit)")
        return engines


def load_daemon_config(path: Path | None, home: Path) -> DaemonConfig:
    """Load the config (explicit path, else ``<home>/modelsmith.toml``, else defaults)."""
    explicit = path is not None
    path = path or home / CONFIG_FILE
    if not path.exists():
        if explicit:
            raise ValidationError(f"{path}: no such config file", data={"file": str(path), "field": None})
        return DaemonConfig()
    try:
        return load_toml_model(path, DaemonConfig)
    except ValidationError as exc:
        raise _without_kind_tags(exc) from exc.__cause__


def _toml_field(field: str) -> str:
    # pydantic puts the union member's tag in the location (engines.x.openai.url); the user
    # wrote engines.x.url.
    parts = field.split(".")
    if len(parts) > 3 and parts[0] == "engines" and parts[2] in _ENGINE_KINDS:
        del parts[2]
    return ".".join(parts)


def _without_kind_tags(exc: ValidationError) -> ValidationError:
    field = exc.data.get("field")
    if not isinstance(field, str) or _toml_field(field) == field:
        return exc
    data = dict(exc.data)
    data["field"] = _toml_field(field)
    data["errors"] = [{**error, "field": _toml_field(error["field"])}
                      for error in exc.data.get("errors", [])]
    return ValidationError(exc.message.replace(f"field {field!r}", f"field {data['field']!r}"),
                           data=data)


def engines_reference() -> str:
    """The Markdown tables of ``[engines.NAME]`` fields, one per kind (in docs/engines.md)."""
    lines: list[str] = []
    for model in (VllmNamedEngine, OpenAINamedEngine):
        (kind,) = get_args(model.model_fields["kind"].annotation)
        lines.extend([f'### `kind = "{kind}"`', "", inspect.cleandoc(model.__doc__ or ""), "",
                      "| field | default | meaning |", "|---|---|---|"])
        # kind first, the prices (common to both kinds) last
        fields = sorted(model.model_fields.items(),
                        key=lambda item: (item[0] != "kind") + item[0].startswith("usd_"))
        for name, field in fields:
            default = ("required" if field.is_required()
                       else repr(field.get_default(call_default_factory=True)))
            lines.append(f"| `{name}` | {default} | {field.description or ''} |")
        lines.append("")
    return "\n".join(lines)
