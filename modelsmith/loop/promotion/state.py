"""What the ledger says about promotions: a request's state, honoured nonces, champions.

Pure reads of a cluster's :class:`~modelsmith.loop.records.ledger.Ledger` (and its record files), shared
by the promotion service and its query methods ``promote.get`` and ``promote.history``.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any

from modelsmith.errors import NotFound
from modelsmith.loop.cluster.fleet import ClusterRuntime
from modelsmith.loop.promotion.policy import iteration_of
from modelsmith.loop.records.ledger import Ledger, LedgerEntry
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
    "seen_nonces",
]


@dataclass
class RequestState:
    """One promotion request as the ledger knows it."""

    entry: LedgerEntry  # promotion.requested
    status: RequestStatus
    signed: list[dict[str, Any]]  # promotion.signed data: approvals while too few
    decision: LedgerEntry | None  # promotion.approved / promotion.rejected


def request_state(ledger: Ledger, request_id: str) -> RequestState:
    """The request's entries; NotFound when the ledger has no such request."""
    requested = next((e for e in ledger.find("promotion.requested")
                      if e.data.get("request_id") == request_id), None)
    if requested is None:
        raise NotFound(f"no promotion request {request_id!r}", data={"request_id": request_id})
    signed = [dict(e.data) for e in ledger.find("promotion.signed")
              if e.data.get("request_id") == request_id]
    for entry in ledger.find("promotion.approved"):
        if entry.data.get("request_id") == request_id:
            return RequestState(requested, "approved", signed, entry)
    for entry in ledger.find("promotion.rejected"):
        if entry.data.get("request_id") == request_id:
            return RequestState(requested, "rejected", signed, entry)
    return RequestState(requested, "pending", signed, None)


def seen_nonces(ledger: Ledger) -> set[str]:
    """Every nonce of a statement the daemon has honoured: each counts once, ever."""
    seen: set[str] = set()
    for entry in ledger.entries():
        if entry.kind in ("promotion.signed", "rollback.done"):
            seen.add(str(entry.data.get("nonce")))
        elif entry.kind in ("promotion.approved", "promotion.rejected"):
            seen.update(str(n) for n in entry.data.get("nonces", ()))
    return seen


def approved_champions(ledger: Ledger) -> list[ChampionEntry]:
    """Every approved promotion, oldest first."""
    return [ChampionEntry(iteration=int(e.data.get("iteration", iteration_of(e.data["adapter"]))),
                          adapter=str(e.data["adapter"]), eval_tag=e.data.get("eval_tag"),
                          request_id=str(e.data["request_id"]), approved_at=e.ts)
            for e in ledger.find("promotion.approved")]


def _approval_view(item: dict[str, Any]) -> ApprovalView:
    return ApprovalView(principal=str(item.get("principal")),
                        key_fingerprint=str(item.get("key_fingerprint")),
                        decision=str(item.get("decision")), time=str(item.get("time")))


def promotion_view(runtime: ClusterRuntime, request_id: str) -> PromotionView:
    """``promote.get``: the record's exact text, its status and who signed so far."""
    ledger = runtime.require_ledger()
    state = request_state(ledger, request_id)
    relative = str(state.entry.data["file"])
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
        decision_file = str(state.decision.data.get("decision_file"))
        with contextlib.suppress(OSError, ValueError):
            decision = json.loads((runtime.cluster.root / decision_file).read_bytes())
        if decision is not None:
            approvals = [_approval_view(item) for item in decision.get("approvals", [])]
    return PromotionView(
        cluster=runtime.cluster.name, request_id=request_id, status=state.status,
        file=relative, sha256=str(state.entry.data["sha256"]), record_text=text, record=record,
        required_approvals=int(record.get("policy", {}).get("required_approvals", 1)),
        approvals=approvals, decision_file=decision_file, decision=decision)


def promotion_history(runtime: ClusterRuntime) -> PromotionHistory:
    """``promote.history``: requests, approved champions and the default rollback target (the
    newest approved iteration below the champion; 0, the base model, when there is none)."""
    ledger = runtime.require_ledger()
    requests = []
    for entry in ledger.find("promotion.requested"):
        request_id = str(entry.data["request_id"])
        requests.append(PromotionSummary(
            request_id=request_id, file=str(entry.data["file"]),
            iteration=int(entry.data["iteration"]), adapter=str(entry.data["adapter"]),
            eval_tag=str(entry.data["eval_tag"]),
            status=request_state(ledger, request_id).status, requested_at=entry.ts))
    approved = approved_champions(ledger)
    champion = runtime.champion
    current = iteration_of(champion) if champion else None
    earlier = [a.iteration for a in approved if current is not None and a.iteration < current]
    return PromotionHistory(
        cluster=runtime.cluster.name, champion=champion, champion_iteration=current,
        pending=runtime.pending_promotion, requests=requests, approved=approved,
        rollback_default=max(earlier) if earlier else (0 if current else None))
