"""``[ray]`` in ``<home>/modelsmith.toml``: engines and trainers on a Ray cluster (off by default).

Pydantic only (no Ray): the daemon's config imports it, and a daemon without ``[ray] address``
never imports ``ray`` at all. What each field does at run time: :mod:`modelsmith.gpu.ray_backend`
(connecting, placement), :mod:`modelsmith.gpu.ray_engine` (engine actors),
:mod:`modelsmith.gpu.ray_trainer` (training tasks); the whole route: docs/scale.md.
"""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["RayEngineSection", "RayRuntimeEnv", "RaySection", "RayTrainerSection"]

# "auto" (a node of this box runs `ray start`), a GCS "host:port", or Ray Client "ray://host:port".
_ADDRESS = r"^(auto|(ray://)?[A-Za-z0-9][A-Za-z0-9.-]{0,252}:[0-9]{1,5})$"
_RESOURCE = re.compile(r"^[A-Za-z][A-Za-z0-9_.:-]{0,63}$")
_RESERVED = frozenset({"CPU", "GPU", "memory", "object_store_memory"})
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


def _check_resources(resources: dict[str, float]) -> dict[str, float]:
    for name, amount in resources.items():
        if not _RESOURCE.match(name) or name in _RESERVED:
            raise ValueError(f"resource name {name!r} must be a custom Ray resource (letters, "
                             "digits, '_', '.', ':', '-'; not CPU, GPU or memory: those have "
                             "their own fields)")
        if not (math.isfinite(amount) and amount > 0):
            raise ValueError(f"resource {name!r}: the amount must be a finite number > 0")
    return resources


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RayRuntimeEnv(_Section):
    """Ray's runtime environment for every actor and task the daemon starts (a subset of
    Ray's ``runtime_env``: the parts a worker node needs to run Modelsmith's code)."""

    env_vars: dict[str, str] = Field(default_factory=dict, description="Environment variables "
                                     "set in every engine actor and trainer task.")
    working_dir: str | None = Field(default=None, description="A local directory (or a URI) "
                                    "Ray uploads to every worker node.")
    py_modules: list[str] = Field(default_factory=list, description="Local directories or "
                                  "wheels Ray ships to every worker node (e.g. a Modelsmith "
                                  "wheel when the nodes do not have it installed).")
    pip: list[str] = Field(default_factory=list, description="Packages Ray installs into a "
                           "worker-side virtual environment.")

    @field_validator("env_vars")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        for name in env:
            if not re.match(_ENV_NAME, name):
                raise ValueError(f"environment variable name {name!r} is not valid")
        return env

    def as_ray(self) -> dict[str, object]:
        """The ``runtime_env`` dict Ray takes (empty fields left out)."""
        return {key: value for key, value in self.model_dump().items() if value}


class RayEngineSection(_Section):
    """What one engine actor asks of the Ray cluster. An engine with ``tensor_parallel_size`` x
    ``pipeline_parallel_size`` > 1 asks Ray for that many GPUs through vLLM's own Ray executor
    (a placement group), and the actor itself takes no GPU."""

    num_cpus: float = Field(default=1.0, ge=0, description="CPUs the engine actor reserves.")
    num_gpus: float = Field(default=1.0, ge=0, description="GPUs the actor reserves when the "
                            "engine spans one GPU (0 on a CPU-only cluster).")
    pipeline_parallel_size: int = Field(default=1, ge=1, description="Pipeline stages (vLLM "
                                        "places them on several nodes through Ray).")
    memory_gb: float | None = Field(default=None, gt=0, description="Host memory the actor "
                                    "reserves (Ray's `memory` resource), in GiB.")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray "
                                        "resources the actor needs (e.g. `{ gpu_box_a = 1 }` to "
                                        "pin it to nodes started with that resource).")
    max_restarts: int = Field(default=-1, ge=-1, description="How often a dead engine actor is "
                              "started again (with exponential backoff); -1: always.")
    restart_backoff_s: float = Field(default=1.0, gt=0, description="First delay before an "
                                     "engine actor is started again; it doubles up to 60 s.")

    @field_validator("resources")
    @classmethod
    def _resources(cls, resources: dict[str, float]) -> dict[str, float]:
        return _check_resources(resources)


class RayTrainerSection(_Section):
    """What one training job asks of the Ray cluster: one trainer actor, or with ``[training]
    num_workers`` > 1 one Ray Train worker each (a coordinating actor then takes no GPU)."""

    num_cpus: float = Field(default=1.0, ge=0, description="CPUs the trainer task reserves.")
    num_gpus: float = Field(default=1.0, ge=0, description="GPUs the trainer task reserves "
                            "(0 on a CPU-only cluster).")
    memory_gb: float | None = Field(default=None, gt=0, description="Host memory the trainer "
                                    "reserves, in GiB.")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray "
                                        "resources the trainer needs.")

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "retries" in data:
            raise ValueError("retries moved to [training] retries in each cluster's cluster.toml "
                             "(it applies to every training job, with or without Ray)")
        return data

    @field_validator("resources")
    @classmethod
    def _resources(cls, resources: dict[str, float]) -> dict[str, float]:
        return _check_resources(resources)


class RaySection(_Section):
    """``[ray]``: run engines and trainers on a Ray cluster. Without ``address`` nothing changes
    (and Ray is not imported). The ledger, scenario sets, supervisors, the RPC socket,
    signatures and approvals stay on the daemon's box. See docs/scale.md."""

    address: str | None = Field(default=None, pattern=_ADDRESS, description='The Ray cluster: '
                                '"auto" (the cluster this box joined with `ray start`), '
                                '"host:port" (its GCS) or "ray://host:port" (Ray Client). '
                                'Unset: no Ray.')
    namespace: str = Field(default="modelsmith", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
                           description="Ray namespace of the daemon's actors.")
    runtime_env: RayRuntimeEnv = Field(default_factory=RayRuntimeEnv,
                                       description="Ray runtime environment.")
    shared_storage: bool = Field(default=False, description="true: the daemon's home is "
                                 "mounted at the same path on every node, so adapters and "
                                 "checkpoints are read and written there directly; false: "
                                 "they travel through Ray's object store and are verified by "
                                 "hash on arrival.")
    connect_timeout_s: float = Field(default=60.0, gt=0, description="Bound on connecting to "
                                     "the cluster.")
    engine: RayEngineSection = Field(default_factory=RayEngineSection,
                                     description="Engine actors.")
    trainer: RayTrainerSection = Field(default_factory=RayTrainerSection,
                                       description="Training tasks.")

    @property
    def enabled(self) -> bool:
        return self.address is not None
