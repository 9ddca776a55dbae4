"""eval.*, scenarios.* and ledger.* params and results."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from modelsmith.rpc.dispatch import MutatingParams, QueryParams

EvalType = Literal["core", "held_out", "full"]


class EvalRunParams(MutatingParams):
    """``eval.run``: the seed's modelsmith_eval_run arguments plus quick and adapter."""

    cluster: str
    tag: str | None = None
    type: EvalType = "full"
    quick: bool = False
    workers: int | None = None
    domain: str | None = None
    adapter: str | None = None  # "base", "champion", "candidate" or "iter-N"; default: newest


class EvalStarted(msgspec.Struct, kw_only=True):
    job_id: str = msgspec.field(name="jobId")
    status: str
    tag: str
    log: str


class EvalRef(QueryParams):
    cluster: str
    tag: str


class GateResult(msgspec.Struct, kw_only=True):
    value: float | None
    threshold: float
    passed: bool


class RegressionReport(msgspec.Struct, kw_only=True):
    baseline_tag: str | None
    compared: int
    count: int
    scenario_ids: list[str]


class ScoreGroup(msgspec.Struct, kw_only=True):
    score: float
    count: int
    passed: int


class EvalSummary(msgspec.Struct, kw_only=True):
    """``evals/<tag>/summary.json``."""

    cluster: str
    tag: str
    job_id: str
    type: str
    quick: bool
    model: str
    base_model: str
    iteration: int
    adapter: str | None
    adapter_hash: str | None
    scenario_sets: dict[str, str]
    scenarios: int
    scored: int
    judge_errors: int
    composite: float
    held_out: float | None
    by_set: dict[str, ScoreGroup]
    by_tag: dict[str, ScoreGroup]
    gates: dict[str, GateResult]
    passed: bool
    regressions: RegressionReport
    started_at: str
    finished_at: str
    duration_s: float
    results_sha256: str
    scoring_errors: dict[str, int] = {}  # scenarios whose scoring timed out or raised, by kind


class CriterionOutcome(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str
    type: str
    weight: float
    score: float
    passed: bool
    detail: str
    error_kind: str | None = None


class ScenarioResult(msgspec.Struct, kw_only=True):
    """One line of ``evals/<tag>/results.jsonl``."""

    scenario_id: str
    set: str
    domain: str
    tags: list[str]
    weight: float
    scenario_hash: str
    prompt: str
    response: str
    reference: str | None
    score: float
    passed: bool
    pass_mark: float
    judge_error: bool
    criteria: list[CriterionOutcome]
    finish_reason: str | None
    completion_tokens: int | None
    # The reasoning removed before scoring ([scoring] strip_reasoning); ``response`` is the
    # answer that was scored. None when nothing was removed (and in older results).
    reasoning: str | None = None


class EvalResultsParams(QueryParams):
    cluster: str
    tag: str
    failed_only: bool = True
    offset: int = 0
    limit: int = 50


class EvalResults(msgspec.Struct, kw_only=True):
    cluster: str
    tag: str
    total: int
    offset: int
    results: list[ScenarioResult]


class EvalCompareParams(QueryParams):
    cluster: str
    a: str
    b: str


class ScenarioDelta(msgspec.Struct, kw_only=True):
    scenario_id: str
    set: str
    status: Literal["fixed", "regressed", "unchanged_pass", "unchanged_fail"]
    score_a: float
    score_b: float
    delta: float


class EvalComparison(msgspec.Struct, kw_only=True):
    cluster: str
    a: str
    b: str
    composite_a: float
    composite_b: float
    composite_delta: float
    held_out_a: float | None
    held_out_b: float | None
    fixed: int
    regressed: int
    unchanged: int
    only_in_a: list[str]
    only_in_b: list[str]
    scenarios: list[ScenarioDelta]


class EvalListParams(QueryParams):
    cluster: str


class EvalListEntry(msgspec.Struct, kw_only=True):
    tag: str
    composite: float | None
    held_out: float | None
    passed: bool | None
    finished_at: str | None
    adapter: str | None


class EvalList(msgspec.Struct, kw_only=True):
    cluster: str
    evals: list[EvalListEntry]


class ScenarioSetInfo(msgspec.Struct, kw_only=True):
    name: str
    version: str
    count: int
    files: list[str]
    recorded_version: str | None


class ScenarioSetsParams(QueryParams):
    cluster: str


class ScenarioSets(msgspec.Struct, kw_only=True):
    cluster: str
    ok: bool
    sets: list[ScenarioSetInfo]
    changed: list[str]
    error: dict[str, Any] | None = None
