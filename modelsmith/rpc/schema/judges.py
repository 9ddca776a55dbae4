"""judge.* params and results: judge calibration checks (docs/judges.md)."""

from __future__ import annotations

from typing import Any

import msgspec

from modelsmith.rpc.dispatch import MutatingParams, QueryParams


class JudgeCheckParams(MutatingParams):
    """``judge.check``: run the judge of ``judges/<judge>.yaml`` (every calibration set when
    ``judge`` is None) on its labelled examples. ``repeats`` overrides the file's."""

    cluster: str
    judge: str | None = None
    repeats: int | None = None


class JudgeCheckStarted(msgspec.Struct, kw_only=True):
    job_id: str = msgspec.field(name="jobId")
    status: str
    cluster: str
    judges: list[str]
    log: str


class JudgeListParams(QueryParams):
    cluster: str


class JudgeCheckResult(msgspec.Struct, kw_only=True):
    """One check of one judge: what the ledger's ``judge.checked`` holds."""

    judge: str
    engine: str
    engine_model: str
    template_sha256: str
    calibration_version: str
    identity: str
    examples: int
    answered: int
    repeats: int
    pass_mark: float
    scale: float
    exact_rate: float | None
    exact_ci95: list[float] | None
    within_one_rate: float | None
    within_one_ci95: list[float] | None
    kappa: float | None
    kappa_ci95: list[float] | None
    spearman: float | None
    spearman_ci95: list[float] | None
    consistency_mean_spread: float | None
    consistency_max_spread: float | None
    consistency_agreeing: float | None
    repeat_failures: int
    order_bias: float | None = None
    report: str = ""
    report_sha256: str = ""
    job_id: str = ""
    checked_at: str | None = None


class JudgeInfo(msgspec.Struct, kw_only=True):
    """A calibration set and where its judge stands: ``check`` is the latest check of the
    judge's current identity (None: never checked as it is now); ``passing`` whether that
    check's kappa meets ``[policy] min_judge_agreement`` (None when no minimum is set)."""

    judge: str
    file: str
    engine: str | None = None
    identity: str | None = None
    template_sha256: str | None = None
    calibration_version: str | None = None
    examples: int = 0
    check: JudgeCheckResult | None = None
    min_agreement: float | None = None
    passing: bool | None = None
    error: dict[str, Any] | None = None


class JudgeList(msgspec.Struct, kw_only=True):
    cluster: str
    judges: list[JudgeInfo]
