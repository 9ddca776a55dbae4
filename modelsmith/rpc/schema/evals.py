"""eval.*, scenarios.* and ledger.* params and results."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from modelsmith.rpc.dispatch import MutatingParams, QueryParams

# synthetic: the synthetic set alone, reported apart (never promotion evidence: the gate needs full).
EvalType = Literal["core", "held_out", "full", "synthetic"]


class EvalRunParams(MutatingParams):
    """``eval.run``: the seed's modelsmith_eval_run arguments plus quick and adapter."""

    cluster: str
    tag: str | None = None
    type: EvalType = "full"
    quick: bool = False
    # Concurrent requests for this eval (default: a named engine's max_concurrency, else all
    # at once: the engine batches).
    workers: Annotated[int, msgspec.Meta(ge=1, le=4096)] | None = None
    domain: str | None = None
    adapter: str | None = None  # "base", "champion", "candidate" or "iter-N"; default: newest
    # A named engine ([engines.NAME] in modelsmith.toml) to run the governed set on instead of
    # the cluster's own: a comparison, never a promotion candidate; no adapter with it.
    engine: str | None = None
    # Trials per scenario (each sampled anew, seed + trial); pass rates, flaky ids and pass^K
    # in the summary. ``temperature`` overrides the cluster's eval sampling temperature.
    repeats: Annotated[int, msgspec.Meta(ge=1, le=100)] = 1
    temperature: Annotated[float, msgspec.Meta(ge=0, le=10)] | None = None


class EvalStarted(msgspec.Struct, kw_only=True):
    job_id: str = msgspec.field(name="jobId")
    status: str
    tag: str
    log: str


class EvalRef(QueryParams):
    cluster: str
    tag: str


class GateResult(msgspec.Struct, kw_only=True):
    value: float | None  # what was compared with the threshold (see basis)
    threshold: float
    passed: bool
    basis: Literal["point", "lower_bound"] = "point"  # [policy] gate_on: the score or its CI's low


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
    # 95% percentile-bootstrap intervals [low, high] over scenarios with their weights
    # (modelsmith.loop.eval.stats); None in summaries written before they existed.
    composite_ci95: list[float] | None = None
    held_out_ci95: list[float] | None = None
    by_tag_ci95: dict[str, list[float]] = {}
    # The weighted mean of the format criteria (json valid/schema, length, regex, a choice's
    # label validity) and of the substance ones (everything else), over the scenarios that
    # have any; None when none has.
    format_score: float | None = None
    substance_score: float | None = None
    # Repeated trials: each scenario's score is the mean of its trials, and it counts as passed
    # when at least half of them passed. pass_at_k: share of scenarios that passed all K.
    repeats: int = 1
    pass_at_k: float | None = None
    flaky: list[str] = []  # passed some trials and failed others
    pass_rates: dict[str, float] = {}  # per scenario, only when repeats > 1
    engine: str | None = None  # the named engine it ran on; None: the cluster's own
    # Over every answer (modelsmith.loop.eval.measures); None where the engine reports nothing.
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    tokens_per_s: float | None = None
    cost_per_1k_scenarios_usd: float | None = None  # None without the engine's prices


class CriterionOutcome(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str
    type: str
    weight: float
    score: float
    passed: bool
    detail: str
    error_kind: str | None = None
    counts_as: Literal["format", "substance", "both"] | None = None  # both: a choice's label
    # A structured judge's reasoning (label, rubric_judge): for reviewers, never shown to the
    # judged model; and a rubric judge's normalised score per named criterion.
    reasoning: str | None = None
    parts: dict[str, float] | None = None


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
    trial: int = 0  # 0..repeats-1: one line per scenario and trial
    # This answer's weighted mean over its format / substance criteria (None: it has none).
    format_score: float | None = None
    substance_score: float | None = None
    # What the engine reported for this answer (None where it does not, and in older results):
    # request to whole answer, time to first token (streaming engines), the server's counts.
    latency_s: float | None = None
    ttft_s: float | None = None
    prompt_tokens: int | None = None


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


class PairedTest(msgspec.Struct, kw_only=True):
    """Eval b against eval a on the ``n`` scenarios both ran (modelsmith.loop.eval.stats)."""

    n: int
    fixed: int  # failed in a, passed in b
    regressed: int  # passed in a, failed in b
    mcnemar_p: float  # exact two-sided binomial test on the discordant pairs
    sign_p: float  # exact two-sided sign test on the score deltas, ties dropped
    mean_delta: float  # weighted mean of score b - score a
    delta_ci95: list[float]  # its 95% bootstrap interval
    improved: int = 0  # scenarios whose score rose (the sign test's counts)
    worsened: int = 0  # scenarios whose score fell


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
    paired: PairedTest | None = None
    composite_ci95_a: list[float] | None = None
    composite_ci95_b: list[float] | None = None
    format_a: float | None = None
    format_b: float | None = None
    format_delta: float | None = None  # None when either eval has no format score
    substance_a: float | None = None
    substance_b: float | None = None
    substance_delta: float | None = None


class EvalListParams(QueryParams):
    cluster: str


class EvalListEntry(msgspec.Struct, kw_only=True):
    tag: str
    composite: float | None
    held_out: float | None
    passed: bool | None
    finished_at: str | None
    adapter: str | None
    engine: str | None = None


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


class EvalReportParams(QueryParams):
    """``eval.report``: the receipts. ``engines`` limits the named engines shown (default: every
    configured one and every one with an eval in the ledger)."""

    cluster: str
    engines: Annotated[list[str], msgspec.Meta(max_length=64)] | None = None


ReportRole = Literal["base", "champion", "candidate", "engine"]
ReportStatus = Literal["current", "stale", "missing", "unverified"]


class ReportRow(msgspec.Struct, kw_only=True):
    """One subject's latest full eval. ``status``: current (on the current set versions: ranked),
    stale (only evals of older set versions exist: shown, never ranked), missing (no full eval),
    unverified (its summary.json does not match the digest the ledger holds: nothing shown)."""

    subject: str  # "base", "champion iter-2", "candidate iter-3", or the engine's name
    role: ReportRole
    status: ReportStatus
    rank: int | None = None  # 1 = best composite among the current rows; ties share a rank
    tag: str | None = None
    adapter: str | None = None
    engine: str | None = None
    model: str | None = None
    finished_at: str | None = None
    scenario_sets: dict[str, str] = {}
    scenarios: int | None = None
    composite: float | None = None
    composite_ci95: list[float] | None = None
    held_out: float | None = None
    pass_rate: float | None = None
    by_tag: dict[str, float] = {}
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    cost_per_1k_scenarios_usd: float | None = None
    note: str | None = None


class EvalReport(msgspec.Struct, kw_only=True):
    """``eval.report``: base, champion, candidate and named engines side by side."""

    cluster: str
    generated_at: str
    scenario_sets: dict[str, str]  # the current versions of the governed sets compared
    tags: list[str]  # the union of the rows' tags, sorted (the per-tag columns)
    rows: list[ReportRow]
