"""The signed records of the promotion gate, typed: a request, a decision, a rollback.

Each is written once under ``<cluster>/promotions/`` as canonical JSON with the daemon's
signature block (:meth:`~modelsmith.loop.records.signing.DaemonKey.sign_record`); the field names
here are the file's, so records written before these types existed read back unchanged. Reading
ignores the ``signature`` block (it is checked separately, over the raw object).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from modelsmith.loop.records.events import ApprovalItem
from modelsmith.rpc.schema.promotion import PolicyCheck

__all__ = [
    "AdapterRef",
    "ChampionRef",
    "DecisionRecord",
    "EvalRef",
    "ModelRef",
    "PolicyTerms",
    "PromotionRequestRecord",
    "Requester",
    "RequesterRef",
    "RollbackRecord",
    "RollbackSide",
    "TrainingManifestRef",
    "record_to_sign",
]


class _Record(msgspec.Struct, frozen=True, kw_only=True):
    pass


class RequesterRef(_Record, frozen=True, kw_only=True):
    uid: int
    username: str
    pid: int


class ModelRef(_Record, frozen=True, kw_only=True):
    name: str
    base_model: str
    # Content hash of the base's config.json + weights index (gpu/model_identity.py), so a
    # reviewer knows which base the adapter belongs to; None in records written before it.
    base_model_sha256: str | None = None


class AdapterRef(_Record, frozen=True, kw_only=True):
    name: str
    path: str
    sha256: str


class EvalRef(_Record, frozen=True, kw_only=True):
    tag: str
    type: str
    quick: bool
    summary_sha256: str | None
    results_sha256: str
    composite: float
    held_out: float | None
    scenarios: int


class TrainingManifestRef(_Record, frozen=True, kw_only=True):
    path: str
    sha256: str | None
    job_id: str | None
    source_eval_tag: str | None


class ChampionRef(_Record, frozen=True, kw_only=True):
    adapter: str | None
    eval_tag: str | None


class PolicyTerms(_Record, frozen=True, kw_only=True):
    composite_threshold: float
    held_out_threshold: float
    max_regressions: int
    required_approvals: int


class PromotionRequestRecord(_Record, frozen=True, kw_only=True, tag_field="kind", tag="promotion.request"):
    """What a reviewer approves: everything the gate bound, signed by the daemon."""

    format: int = 1
    request_id: str
    cluster: str
    created_at: str
    requested_by: RequesterRef
    note: str | None
    model: ModelRef
    iteration: int
    adapter: AdapterRef
    eval: EvalRef
    scenario_sets: dict[str, str]
    training_manifest: TrainingManifestRef
    champion: ChampionRef
    regressions: Any
    policy: PolicyTerms
    gate: list[PolicyCheck]


class DecisionRecord(_Record, frozen=True, kw_only=True, tag_field="kind", tag="promotion.decision"):
    """The outcome of a request: the approvals (or the rejection) that decided it."""

    format: int = 1
    cluster: str
    request_id: str
    decision: str  # "approved" | "rejected"
    reason: str | None
    request_file: str
    request_sha256: str
    iteration: int
    adapter: AdapterRef
    eval_tag: str
    approvals: list[ApprovalItem]
    required_approvals: int
    decided_at: str


class RollbackSide(_Record, frozen=True, kw_only=True):
    adapter: str | None
    iteration: int
    request_id: str | None = None
    eval_tag: str | None = None
    adapter_sha256: str | None = None


class RollbackRecord(_Record, frozen=True, kw_only=True, tag_field="kind", tag="rollback"):
    format: int = 1
    cluster: str
    rollback_id: str
    created_at: str
    from_: RollbackSide = msgspec.field(name="from")
    to: RollbackSide
    principal: str
    key_fingerprint: str
    reason: str | None
    nonce: str
    statement: str
    signature: str
    daemon_pid: int


def record_to_sign(record: PromotionRequestRecord | DecisionRecord | RollbackRecord
                   ) -> dict[str, Any]:
    """The JSON object the daemon signs and writes for ``record``."""
    data: dict[str, Any] = msgspec.to_builtins(record)
    return data


def read_record(data: dict[str, Any], kind: type[PromotionRequestRecord] | type[DecisionRecord]
                ) -> Any:
    """A record file's object (signature already checked) as its type; the block is ignored."""
    return msgspec.convert({k: v for k, v in data.items() if k != "signature"}, kind)


@dataclass(frozen=True, slots=True)
class Requester:
    """Who asked for a promotion: the peer credentials of the RPC connection."""

    uid: int
    pid: int
    username: str

    @classmethod
    def of(cls, uid: int, pid: int) -> Requester:
        import pwd

        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = f"uid-{uid}"
        return cls(uid=uid, pid=pid, username=name)
