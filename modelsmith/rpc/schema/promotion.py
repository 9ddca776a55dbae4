"""policy.*, promote.* and bundle.* params and results (the promotion gate)."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from modelsmith.rpc.dispatch import MutatingParams, QueryParams
from modelsmith.rpc.schema.evals import PairedTest

RequestStatus = Literal["pending", "approved", "rejected"]


class PolicyCheckParams(QueryParams):
    """``policy.check``: judge the candidate against the cluster's policy (changes nothing)."""

    cluster: str
    eval_tag: str | None = None  # default: the newest finished eval of the candidate


class PolicyCheck(msgspec.Struct, kw_only=True):
    """One rule of the gate: its stable name, whether it passed, and what to fix if not."""

    check: str
    passed: bool
    detail: str


class PolicyReport(msgspec.Struct, kw_only=True):
    """Every rule's outcome, never only the first failure, so an agent can fix them all."""

    cluster: str
    iteration: int
    adapter: str | None
    eval_tag: str | None
    composite: float | None
    held_out: float | None
    passed: bool
    checks: list[PolicyCheck]
    # Candidate vs the champion's eval (or the base model's), paired by scenario; None: no baseline.
    paired: PairedTest | None = None
    paired_baseline_tag: str | None = None


class PromoteRequestParams(MutatingParams):
    """``promote.request``: write a signed promotion request if the gate passes."""

    cluster: str
    eval_tag: str | None = None
    note: str | None = None


class PromotionRequested(msgspec.Struct, kw_only=True):
    request_id: str
    cluster: str
    model: str
    base_model: str
    iteration: int
    adapter: str
    adapter_path: str
    adapter_sha256: str
    eval_tag: str
    composite: float
    held_out: float | None
    directory: str  # <cluster>/promotions/
    file: str  # the record's file name inside directory
    sha256: str  # of the record file's bytes: what reviewers sign as request_digest
    required_approvals: int
    approve_command: str
    reject_command: str


class PromoteGetParams(QueryParams):
    cluster: str
    request_id: str


class ApprovalView(msgspec.Struct, kw_only=True):
    principal: str
    key_fingerprint: str
    decision: str
    time: str


class PromotionView(msgspec.Struct, kw_only=True):
    """A request as stored, with its exact bytes, so a reviewer hashes what they sign."""

    cluster: str
    request_id: str
    status: RequestStatus
    file: str  # path relative to the cluster directory
    sha256: str  # recorded in the ledger when the request was written
    record_text: str  # the record file's exact content
    record: dict[str, Any]
    required_approvals: int
    approvals: list[ApprovalView]
    decision_file: str | None
    decision: dict[str, Any] | None


class PromoteDecideParams(MutatingParams):
    """``promote.decide``: a reviewer's signed approve/reject statement. CLI only, never MCP."""

    cluster: str
    request_id: str
    statement: str  # the exact bytes that were signed (canonical JSON, see approval.py)
    signature: str  # armored SSHSIG from ``ssh-keygen -Y sign -n modelsmith-approval-v1``
    principal: str | None = None  # like ``ssh-keygen -Y verify -I``; default: any line's


class PromotionDecided(msgspec.Struct, kw_only=True):
    cluster: str
    request_id: str
    status: RequestStatus
    principal: str
    approvals: list[str]  # principals whose approvals count so far
    required_approvals: int
    decision_file: str | None  # set once the request is decided
    champion: str | None
    engine: str  # "serving", "off" (no engine in this daemon) or "error: ..."


class PromoteHistoryParams(QueryParams):
    cluster: str


class PromotionSummary(msgspec.Struct, kw_only=True):
    request_id: str
    file: str
    iteration: int
    adapter: str
    eval_tag: str
    status: RequestStatus
    requested_at: str


class ChampionEntry(msgspec.Struct, kw_only=True):
    """An approved promotion: a champion the cluster had and can roll back to."""

    iteration: int
    adapter: str
    eval_tag: str | None
    request_id: str
    approved_at: str


class PromotionHistory(msgspec.Struct, kw_only=True):
    cluster: str
    champion: str | None
    champion_iteration: int | None
    pending: str | None
    requests: list[PromotionSummary]
    approved: list[ChampionEntry]
    rollback_default: int | None  # the iteration `modelsmith rollback` picks without --to


class PromoteRollbackParams(MutatingParams):
    """``promote.rollback``: a reviewer's signed rollback statement. CLI only, never MCP."""

    cluster: str
    statement: str
    signature: str
    principal: str | None = None


class RollbackDone(msgspec.Struct, kw_only=True):
    cluster: str
    rollback_id: str
    adapter: str | None  # None: back to the base model (iteration 0)
    to_iteration: int
    previous_champion: str | None
    principal: str
    file: str  # relative to the cluster directory
    engine: str


class BundleExportParams(MutatingParams):
    """``bundle.export``: write the evidence bundle of one promotion request."""

    cluster: str
    request_id: str


class BundleExported(msgspec.Struct, kw_only=True):
    cluster: str
    request_id: str
    directory: str
    html: str
    tarball: str
    tarball_sha256: str
    files: int
