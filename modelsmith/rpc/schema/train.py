"""train.* and diagnose.* params and results."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from modelsmith.rpc.dispatch import MutatingParams, QueryParams
from modelsmith.rpc.schema.jobs import JobSummary


class TrainOverrides(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    max_steps: int | None = None
    learning_rate: float | None = None
    num_generations: int | None = None
    per_device_train_batch_size: int | None = None
    max_completion_length: int | None = None
    beta: float | None = None
    temperature: float | None = None
    save_steps: int | None = None
    seed: int | None = None
    near_miss_margin: float | None = None


class TrainStartParams(MutatingParams):
    """``train.start``: the seed's modelsmith_train_start arguments plus overrides."""

    cluster: str
    eval_tag: str
    method: Literal["grpo"] = "grpo"
    # failures+synthetic: the failures and the synthetic scenarios made for their patterns.
    target: Literal["failures", "failures+near_misses", "failures+synthetic"] = "failures"
    # Where the adapter starts: "latest" = the newest candidate, else the champion, else the base.
    init: Literal["latest", "candidate", "champion", "base"] = "latest"
    overrides: TrainOverrides | None = None
    follow_up_eval: bool = True


class TrainStarted(msgspec.Struct, kw_only=True):
    job_id: str = msgspec.field(name="jobId")
    status: str
    cluster: str
    estimated_duration_minutes: int
    iteration: int
    scenarios: int
    log: str


class TrainJobRef(QueryParams):
    job_id: str


class TrainCancelParams(MutatingParams):
    job_id: str


class TrainStatus(msgspec.Struct, kw_only=True):
    job: JobSummary
    iteration: int | None
    step: int | None
    total_steps: int | None
    stop_reason: str | None
    metrics: list[dict[str, Any]]
    adapter: str | None
    follow_up_eval: dict[str, Any] | None


class DiagnoseParams(QueryParams):
    cluster: str
    tag: str


class FailureExample(msgspec.Struct, kw_only=True):
    scenario_id: str
    score: float
    detail: str
    response: str
    reference: str | None


class FailurePattern(msgspec.Struct, kw_only=True):
    pattern: str
    criterion: str
    kind: str
    count: int
    lost_score: float
    tags: dict[str, int]
    scenario_ids: list[str]
    examples: list[FailureExample]


class Diagnosis(msgspec.Struct, kw_only=True):
    cluster: str
    tag: str
    scenarios: int
    failed: int
    near_misses: int
    patterns: list[FailurePattern]
    by_tag: dict[str, int]
    # Repeated trials (eval --repeats): ``failed`` and the patterns count the scenarios that
    # failed every trial; those that passed some and failed others are listed apart as flaky.
    repeats: int = 1
    consistent_failures: list[str] = []
    flaky: list[str] = []
    pass_rates: dict[str, float] = {}  # of the flaky scenarios
