"""What the ledger says about promotions: a request's state, honoured nonces, champions.

Pure reads of a cluster's :class:`~modelsmith.loop.records.ledger.Ledger` (and its record files), shared
by the promotion service and its query methods ``promote.get`` and ``promote.history``.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any

from modelsmith.errors import NotFound, ValidationError
from modelsmith.loop.cluster.fleet import ClusterRuntime
from modelsmith.loop.promotion.policy import iteration_of
from modelsmith.loop.records.events import (
    ApprovalItem,
    EvalFinished,
    PromotionApproved,
    PromotionRejected,
    PromotionRequested,
    PromotionSigned,
    RollbackDone,
    ScenariosAccepted,
)
from modelsmith.loop.records.ledger import Ledger, Recorded
from modelsmith.rpc.schema.promotion import (
    ApprovalView,
    ChampionEntry,
    PromotionHistory,
    PromotionSummary,
    PromotionView,
    RequestStatus,
)

__all__ = [
    "RequestState",
    "approved_champions",
    "promotion_history",
    "promotion_view",
    "request_state",
    "rollback_target",
    "seen_nonces",
]


@dataclass
class RequestState:
    """One promotion request as the ledger knows it."""

    requested: Recorded[PromotionRequested]
    status: RequestStatus
    signed: list[ApprovalItem]  # promotion.signed: approvals while too few
    decision: Recorded[PromotionApproved] | Recorded[PromotionRejected] | None


def request_state(ledger: Ledger, request_id: str) -> RequestState:
    """The request's entries; NotFound when the ledger has no such request."""
    requested = next((r for r in ledger.find(PromotionRequested)
                      if r.event.request_id == request_id), None)
    if requested is None:
        raise NotFound(f"no promotion request {request_id!r}", data={"request_id": request_id})
    signed = [r.event.item() for r in ledger.find(PromotionSigned)
              if r.event.request_id == request_id]
    for approved in ledger.find(PromotionApproved):
        if approved.event.request_id == request_id:
            return RequestState(requested, "approved", signed, approved)
    for rejected in ledger.find(PromotionRejected):
        if rejected.event.request_id == request_id:
            return RequestState(requested, "rejected", signed, rejected)
    return RequestState(requested, "pending", signed, None)


def seen_nonces(ledger: Ledger) -> set[str]:
    """Every nonce of a statement the daemon has honoured: each counts once, ever."""
    seen: set[str] = set()
    for recorded in ledger.recorded():
        event = recorded.event
        if isinstance(event, PromotionSigned | RollbackDone | ScenariosAccepted):
            seen.add(event.nonce)
        elif isinstance(event, PromotionApproved | PromotionRejected):
            seen.update(event.nonces)
    return seen


def approved_champions(ledger: Ledger) -> list[ChampionEntry]:
    """Every approved promotion, oldest first."""
    return [ChampionEntry(iteration=r.event.iteration, adapter=r.event.adapter,
                          eval_tag=r.event.eval_tag, request_id=r.event.request_id,
                          approved_at=r.ts)
            for r in ledger.find(PromotionApproved)]


def _approval_view(item: ApprovalItem | dict[str, Any]) -> ApprovalView:
    if isinstance(item, ApprovalItem):
        return ApprovalView(principal=item.principal, key_fingerprint=item.key_fingerprint,
                            decision=item.decision, time=item.time)
    return ApprovalView(principal=str(item.get("principal")),
                        key_fingerprint=str(item.get("key_fingerprint")),
                        decision=str(item.get("decision")), time=str(item.get("time")))


def promotion_view(runtime: ClusterRuntime, request_id: str) -> PromotionView:
    """``promote.get``: the record's exact text, its status and who signed so far."""
    ledger = runtime.require_ledger()
    state = request_state(ledger, request_id)
    relative = state.requested.event.file
    try:
        text = (runtime.cluster.root / relative).read_text(encoding="utf-8")
        record = json.loads(text)
    except (OSError, ValueError) as exc:
        raise NotFound(f"promotion record {relative} is unreadable: {exc}",
                       data={"file": relative}) from exc
    decision: dict[str, Any] | None = None
    decision_file: str | None = None
    approvals = [_approval_view(item) for item in state.signed]
    if state.decision is not None:
        decision_file = state.decision.event.decision_file
        with contextlib.suppress(OSError, ValueError):
            decision = json.loads((runtime.cluster.root / decision_file).read_bytes())
        if decision is not None:
            approvals = [_approval_view(item) for item in decision.get("approvals", [])]
    return PromotionView(
        cluster=runtime.cluster.name, request_id=request_id, status=state.status,
        file=relative, sha256=state.requested.event.sha256, record_text=text, record=record,
        required_approvals=int(record.get("policy", {}).get("required_approvals", 1)),
        approvals=approvals, decision_file=decision_file, decision=decision)


def promotion_history(runtime: ClusterRuntime) -> PromotionHistory:
    """``promote.history``: requests, approved champions and the default rollback target (the
    newest approved iteration below the champion; 0, the base model, when there is none)."""
    ledger = runtime.require_ledger()
    requests = []
    for recorded in ledger.find(PromotionRequested):
        event = recorded.event
        requests.append(PromotionSummary(
            request_id=event.request_id, file=event.file, iteration=event.iteration,
            adapter=event.adapter, eval_tag=event.eval_tag,
            status=request_state(ledger, event.request_id).status, requested_at=recorded.ts))
    approved = approved_champions(ledger)
    champion = runtime.champion
    current = iteration_of(champion) if champion else None
    earlier = [a.iteration for a in approved if current is not None and a.iteration < current]
    return PromotionHistory(
        cluster=runtime.cluster.name, champion=champion, champion_iteration=current,
        pending=runtime.pending_promotion, requests=requests, approved=approved,
        rollback_default=max(earlier) if earlier else (0 if current else None))


def rollback_target(runtime: ClusterRuntime, to_iteration: int
                    ) -> tuple[str | None, str | None, str | None, str | None]:
    """(adapter, its sha256, approving request, eval tag) of an approved iteration; 0 is the
    base model. The adapter must still hash to what was approved."""
    ledger = runtime.require_ledger()
    if to_iteration == 0:
        base_evals = [r.event.tag for r in ledger.find(EvalFinished) if r.event.adapter is None and r.event.own_evidence()]
        return None, None, None, (base_evals[-1] if base_evals else None)
    approved = next((r.event for r in reversed(ledger.find(PromotionApproved))
                     if r.event.iteration == to_iteration), None)
    if approved is None:
        raise NotFound(f"iteration {to_iteration} was never approved in "
                       f"{runtime.cluster.name}; only approved iterations can be served",
                       data={"to_iteration": to_iteration})
    adapter = approved.adapter
    from modelsmith.gpu.adapters import verify_adapter

    adapter_path = runtime.adapter_path(adapter)
    manifest = verify_adapter(adapter_path)
    if manifest.adapter_sha256 != approved.adapter_sha256:
        raise ValidationError(f"adapter {adapter} changed since it was approved",
                              data={"file": str(adapter_path), "reason": "altered"})
    return adapter, manifest.adapter_sha256, approved.request_id, approved.eval_tag
