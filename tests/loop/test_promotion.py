"""The promotion gate end to end on real files: signed requests, SSH-signed decisions, rollback.

Reviewers' keys are made by ssh-keygen and statements are signed by ``ssh-keygen -Y sign``; the
only stand-in is the inference engine (it records which adapters it was told to serve).
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from support.promotion_home import (
    CLUSTER,
    CORE_IDS,
    HELD_IDS,
    PromotionHome,
    Reviewer,
    allow_signers,
    engine_pool_for,
    make_reviewer,
)

from modelsmith.errors import (
    ConflictError,
    GateFailed,
    NotFound,
    SignatureError,
    Unavailable,
    ValidationError,
)
from modelsmith.loop.cluster.fleet import ClusterRuntime, Fleet
from modelsmith.loop.cluster.state import reduce
from modelsmith.loop.eval.service import EvalService
from modelsmith.loop.jobs.registry import JobRegistry
from modelsmith.loop.promotion.record_files import verify_cluster_records
from modelsmith.loop.promotion.records import PromotionRequestRecord
from modelsmith.loop.promotion.service import PromotionService, Requester
from modelsmith.loop.records.approval import make_statement
from modelsmith.loop.records.events import (
    PromotionApproved,
    PromotionRejected,
    PromotionRequested,
    RollbackDone,
)
from modelsmith.loop.records.ledger import Ledger
from modelsmith.loop.records.signing import verify_record

ME = Requester(uid=os.getuid(), pid=os.getpid(), username="agent")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Reviewer]:
    directory = tmp_path_factory.mktemp("keys")
    return {name: make_reviewer(directory, name) for name in ("alice", "bob", "mallory")}


class Gate:
    """A cluster home, its runtime and the service, as the daemon wires them."""

    def __init__(self, tmp_path: Path, keys: dict[str, Reviewer], *, required_approvals: int = 1,
                 clock_offset: timedelta = timedelta(0)) -> None:
        self.keys = keys
        self.home = PromotionHome(tmp_path / "home", required_approvals=required_approvals)
        allow_signers(self.home.home, f"alice {keys['alice'].public_line}",
                      f"bob {keys['bob'].public_line}")
        self.clock_offset = clock_offset
        self.fleet: Fleet | None = None
        self.runtime: ClusterRuntime | None = None

    def start(self) -> PromotionService:
        self.fleet, self.runtime = self.home.open()
        pool, self.engine = engine_pool_for(self.runtime.cluster)
        return PromotionService(self.fleet, pool, self.home.home,
                                clock=lambda: datetime.now(UTC) + self.clock_offset)

    @property
    def ledger(self) -> Ledger:
        assert self.runtime is not None
        return self.runtime.require_ledger()

    def statement(self, service: PromotionService, request_id: str, decision: str = "approve",
                  **overrides: Any) -> bytes:
        assert self.runtime is not None
        entry = next(r.event for r in self.ledger.find(PromotionRequested)
                     if r.event.request_id == request_id)
        fields: dict[str, Any] = {"cluster": CLUSTER, "decision": decision, "reason": "looks good",
                                  "request_id": request_id, "request_digest": entry.sha256}
        fields.update(overrides)
        return make_statement(**fields)

    async def decide(self, service: PromotionService, request_id: str, reviewer: str = "alice",
                     decision: str = "approve", **overrides: Any) -> Any:
        statement = self.statement(service, request_id, decision, **overrides)
        return await service.decide(CLUSTER, request_id, statement.decode(),
                                    self.keys[reviewer].sign(statement))


@pytest.fixture
def gate(tmp_path: Path, keys: dict[str, Reviewer]) -> Gate:
    return Gate(tmp_path, keys)


# -- requests ---------------------------------------------------------------------------------


async def test_a_request_writes_one_signed_record_that_binds_the_evidence(gate: Gate) -> None:
    adapter = gate.home.trained_candidate()
    service = gate.start()

    requested = await service.request(CLUSTER, ME, note="held-out up")

    root = gate.home.root
    record_path = root / "promotions" / requested.file
    assert requested.file.endswith(f"-{requested.request_id}.json")
    assert requested.file[:10] == datetime.now(UTC).strftime("%Y-%m-%d")
    raw = record_path.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == requested.sha256
    record = json.loads(raw)
    verify_record(record, service.key().public_key_b64)
    manifest = json.loads((root / "adapters" / adapter / "manifest.json").read_text())
    assert record["adapter"] == {"name": adapter, "path": str(root / "adapters" / adapter),
                                 "sha256": manifest["adapter_sha256"]}
    summary_raw = (root / "evals" / "iter-1-full" / "summary.json").read_bytes()
    assert record["eval"]["summary_sha256"] == hashlib.sha256(summary_raw).hexdigest()
    assert record["scenario_sets"] == gate.home.catalog.versions()
    manifest_raw = (root / "adapters" / adapter / "training_manifest.json").read_bytes()
    assert record["training_manifest"]["sha256"] == hashlib.sha256(manifest_raw).hexdigest()
    assert record["iteration"] == 1 and record["model"]["name"] == "tiny-llama"
    assert record["policy"]["required_approvals"] == 1
    assert record["requested_by"]["uid"] == os.getuid()
    entry = gate.ledger.last_of(PromotionRequested)
    assert entry is not None
    assert entry.event.sha256 == requested.sha256
    assert entry.event.file == f"promotions/{requested.file}"
    assert gate.runtime is not None
    assert gate.runtime.phase == "awaiting_approval"
    assert gate.runtime.pending_promotion == requested.request_id
    assert requested.approve_command == f"modelsmith approve {CLUSTER} {requested.request_id}"


async def test_a_request_is_refused_with_every_failing_reason_when_the_gate_fails(
    gate: Gate,
) -> None:
    gate.home.trained_candidate(passed=set(CORE_IDS[:3]))
    service = gate.start()

    with pytest.raises(GateFailed) as refused:
        await service.request(CLUSTER, ME)

    assert refused.value.code == 1005
    assert set(refused.value.data["failed"]) == {"composite", "held_out", "regressions"}
    assert len(refused.value.data["checks"]) == 14
    assert not (gate.home.root / "promotions").exists()
    assert gate.ledger.last_of(PromotionRequested) is None


async def test_a_pending_request_blocks_a_second_one(gate: Gate) -> None:
    gate.home.trained_candidate()
    service = gate.start()
    await service.request(CLUSTER, ME)

    with pytest.raises(ConflictError):
        await service.request(CLUSTER, ME)
    report = await service.policy_check(CLUSTER)
    assert [c.check for c in report.checks if not c.passed] == ["cluster_state"]


async def test_records_are_never_overwritten(gate: Gate) -> None:
    gate.home.trained_candidate()
    service = gate.start()
    requested = await service.request(CLUSTER, ME)
    assert gate.runtime is not None
    path = f"promotions/{requested.file}"
    before = (gate.home.root / path).read_bytes()

    with pytest.raises(ConflictError):
        forged = msgspec.convert(json.loads(before), PromotionRequestRecord)
        service._write_record(gate.runtime, path, msgspec.structs.replace(forged, note="forged"))

    assert (gate.home.root / path).read_bytes() == before


# -- approval -------------------------------------------------------------------------------------


async def test_an_approval_by_a_listed_reviewer_makes_the_adapter_the_served_champion(
    gate: Gate,
) -> None:
    adapter = gate.home.trained_candidate()
    service = gate.start()
    requested = await service.request(CLUSTER, ME)

    decided = await gate.decide(service, requested.request_id)

    assert decided.status == "approved" and decided.approvals == ["alice"]
    assert decided.champion == adapter and decided.engine == "serving"
    assert gate.engine.loaded == [(f"{CLUSTER}:{adapter}", gate.home.root / "adapters" / adapter)]
    runtime = gate.runtime
    assert runtime is not None
    assert (runtime.champion, runtime.candidate, runtime.phase, runtime.pending_promotion) == (
        adapter, None, "idle", None)
    assert decided.decision_file == f"promotions/{requested.file[:-5]}.decision.json"
    decision = json.loads((gate.home.root / decided.decision_file).read_bytes())
    verify_record(decision, service.key().public_key_b64)
    assert decision["decision"] == "approved"
    assert decision["request_sha256"] == requested.sha256
    assert decision["approvals"][0]["principal"] == "alice"
    assert "BEGIN SSH SIGNATURE" in decision["approvals"][0]["signature"]
    approved = gate.ledger.last_of(PromotionApproved)
    assert approved is not None
    assert approved.event.adapter == adapter and approved.event.principals == ["alice"]
    # A restarted daemon rebuilds the same state from the ledger.
    fresh = reduce(gate.ledger.recorded())
    assert (fresh.champion, fresh.pending_promotion, fresh.phase) == (adapter, None, "idle")
    assert verify_cluster_records(gate.home.root) == []
    view = await service.get(CLUSTER, requested.request_id)
    assert view.status == "approved" and [a.principal for a in view.approvals] == ["alice"]


async def test_two_required_approvals_need_two_distinct_reviewers(
    tmp_path: Path, keys: dict[str, Reviewer]
) -> None:
    gate = Gate(tmp_path, keys, required_approvals=2)
    gate.home.trained_candidate()
    service = gate.start()
    requested = await service.request(CLUSTER, ME)

    first = await gate.decide(service, requested.request_id, "alice")
    assert (first.status, first.approvals) == ("pending", ["alice"])
    assert gate.engine.loaded == []
    with pytest.raises(ConflictError):
        await gate.decide(service, requested.request_id, "alice")  # a fresh statement, same person
    second = await gate.decide(service, requested.request_id, "bob")

    assert (second.status, sorted(second.approvals)) == ("approved", ["alice", "bob"])
    assert gate.ledger.last_of(PromotionApproved) is not None


async def test_a_rejection_records_the_reason_and_returns_the_cluster_to_the_loop(
    gate: Gate,
) -> None:
    adapter = gate.home.trained_candidate()
    service = gate.start()
    requested = await service.request(CLUSTER, ME)

    decided = await gate.decide(service, requested.request_id, "bob", "reject",
                                reason="held-out too thin")

    assert decided.status == "rejected" and gate.engine.loaded == []
    runtime = gate.runtime
    assert runtime is not None
    assert (runtime.champion, runtime.candidate, runtime.phase) == (None, adapter, "idle")
    rejected = gate.ledger.last_of(PromotionRejected)
    assert rejected is not None and rejected.event.reason == "held-out too thin"
    with pytest.raises(ConflictError):
        await gate.decide(service, requested.request_id)


# -- refusals -------------------------------------------------------------------------------------


async def _pending(gate: Gate) -> tuple[PromotionService, str]:
    gate.home.trained_candidate()
    service = gate.start()
    return service, (await service.request(CLUSTER, ME)).request_id


def _reason(info: pytest.ExceptionInfo[SignatureError]) -> str:
    assert info.value.code == 1006
    return str(info.value.data["reason"])


async def test_a_signer_not_in_allowed_signers_is_refused(gate: Gate) -> None:
    service, request_id = await _pending(gate)
    with pytest.raises(SignatureError) as refused:
        await gate.decide(service, request_id, "mallory")
    assert _reason(refused) == "unknown_signer"
    assert gate.runtime is not None and gate.runtime.pending_promotion == request_id


async def test_a_signature_in_another_namespace_is_refused(gate: Gate) -> None:
    service, request_id = await _pending(gate)
    statement = gate.statement(service, request_id)
    signature = gate.keys["alice"].sign(statement, namespace="git")
    with pytest.raises(SignatureError) as refused:
        await service.decide(CLUSTER, request_id, statement.decode(), signature)
    assert _reason(refused) == "wrong_namespace"


async def test_a_signature_over_another_request_is_refused(gate: Gate) -> None:
    service, request_id = await _pending(gate)
    other = hashlib.sha256(b"another request").hexdigest()
    with pytest.raises(SignatureError) as refused:
        await gate.decide(service, request_id, request_digest=other)
    assert _reason(refused) == "digest_mismatch"


async def test_an_expired_statement_is_refused(tmp_path: Path, keys: dict[str, Reviewer]) -> None:
    gate = Gate(tmp_path, keys)
    service, request_id = await _pending(gate)
    with pytest.raises(SignatureError) as refused:
        await gate.decide(service, request_id, time=datetime.now(UTC) - timedelta(hours=2))
    assert _reason(refused) == "expired"


async def test_a_replayed_statement_is_refused_also_after_a_restart(
    tmp_path: Path, keys: dict[str, Reviewer]
) -> None:
    gate = Gate(tmp_path, keys, required_approvals=2)
    service, request_id = await _pending(gate)
    statement = gate.statement(service, request_id)
    signature = keys["alice"].sign(statement)
    await service.decide(CLUSTER, request_id, statement.decode(), signature)

    with pytest.raises(SignatureError) as refused:
        await service.decide(CLUSTER, request_id, statement.decode(), signature)
    assert _reason(refused) == "replayed"
    restarted = gate.start()
    with pytest.raises(SignatureError) as refused_again:
        await restarted.decide(CLUSTER, request_id, statement.decode(), signature)
    assert _reason(refused_again) == "replayed"


async def test_a_tampered_request_record_is_refused(gate: Gate) -> None:
    service, request_id = await _pending(gate)
    entry = gate.ledger.last_of(PromotionRequested)
    assert entry is not None
    path = gate.home.root / entry.event.file
    statement = gate.statement(service, request_id)  # signed over the genuine digest
    signature = gate.keys["alice"].sign(statement)
    data = bytearray(path.read_bytes())
    data[data.index(b'"iteration": 1') + len(b'"iteration": ')] = ord("7")
    path.write_bytes(bytes(data))

    with pytest.raises(SignatureError) as refused:
        await service.decide(CLUSTER, request_id, statement.decode(), signature)

    assert _reason(refused) == "tampered"
    problems = verify_cluster_records(gate.home.root)
    assert len(problems) == 2  # the sha256 and the daemon signature both fail
    assert all(entry.event.file in p for p in problems)


async def test_a_rollback_statement_cannot_decide_a_request(gate: Gate) -> None:
    service, request_id = await _pending(gate)
    digest = gate.ledger.find(PromotionRequested)[-1].event.sha256
    statement = make_statement(cluster=CLUSTER, decision="rollback", reason="x", to_iteration=0,
                               request_id=request_id, request_digest=digest)
    with pytest.raises(ValidationError):
        await service.decide(CLUSTER, request_id, statement.decode(),
                             gate.keys["alice"].sign(statement))


# -- rollback -------------------------------------------------------------------------------------


async def _promote_two_iterations(gate: Gate, first: str = "approve") -> PromotionService:
    """Iteration 1 promoted (or rejected), then iteration 2 trained, evaluated and approved."""
    gate.home.trained_candidate(1)
    service = gate.start()
    request = await service.request(CLUSTER, ME)
    await gate.decide(service, request.request_id, decision=first)
    gate.home.add_adapter(2, source_eval="iter-1-full")
    gate.home.add_eval("iter-2-full", "iter-2", set(CORE_IDS + HELD_IDS), iteration=2)
    runtime = gate.runtime
    assert runtime is not None
    request = await service.request(CLUSTER, ME)
    await gate.decide(service, request.request_id, "bob")
    assert runtime.champion == "iter-2"
    return service


def _rollback_statement(to_iteration: int, **overrides: Any) -> bytes:
    return make_statement(cluster=CLUSTER, decision="rollback", reason="p99 latency regression",
                          to_iteration=to_iteration, **overrides)


async def test_a_signed_rollback_serves_the_previous_champion_at_once(gate: Gate) -> None:
    service = await _promote_two_iterations(gate)
    history = await service.history(CLUSTER)
    assert history.rollback_default == 1
    statement = _rollback_statement(history.rollback_default)

    done = await service.rollback(CLUSTER, statement.decode(), gate.keys["alice"].sign(statement))

    assert (done.adapter, done.previous_champion, done.engine) == ("iter-1", "iter-2", "serving")
    assert (f"{CLUSTER}:iter-1", gate.home.root / "adapters" / "iter-1") in gate.engine.loaded
    assert gate.runtime is not None and gate.runtime.champion == "iter-1"
    # What is served by default (eval, generation) follows the champion at once.
    evals = EvalService(gate.fleet, JobRegistry(), service.engines)
    assert evals.resolve_adapter(gate.runtime, None) == "iter-1"
    assert done.file.startswith("promotions/") and "-rollback-" in done.file
    record = json.loads((gate.home.root / done.file).read_bytes())
    verify_record(record, service.key().public_key_b64)
    assert record["to"]["adapter"] == "iter-1" and record["principal"] == "alice"
    entry = gate.ledger.last_of(RollbackDone)
    assert entry is not None and entry.event.to_iteration == 1
    assert reduce(gate.ledger.recorded()).champion == "iter-1"
    assert verify_cluster_records(gate.home.root) == []


async def test_a_rollback_to_an_iteration_never_approved_is_refused(gate: Gate) -> None:
    service = await _promote_two_iterations(gate, first="reject")
    statement = _rollback_statement(1)
    with pytest.raises(NotFound):
        await service.rollback(CLUSTER, statement.decode(), gate.keys["alice"].sign(statement))
    statement = _rollback_statement(2)
    with pytest.raises(ConflictError):  # the champion itself is not earlier
        await service.rollback(CLUSTER, statement.decode(), gate.keys["alice"].sign(statement))
    assert (await service.history(CLUSTER)).rollback_default == 0  # the base model
    assert gate.runtime is not None and gate.runtime.champion == "iter-2"


async def test_a_rollback_by_an_unlisted_key_is_refused(gate: Gate) -> None:
    service = await _promote_two_iterations(gate)
    statement = _rollback_statement(1)
    with pytest.raises(SignatureError) as refused:
        await service.rollback(CLUSTER, statement.decode(), gate.keys["mallory"].sign(statement))
    assert _reason(refused) == "unknown_signer"
    assert gate.runtime is not None and gate.runtime.champion == "iter-2"


async def test_records_missing_from_the_ledger_are_reported(gate: Gate) -> None:
    await _pending(gate)
    stray = gate.home.root / "promotions" / "2026-01-01-stray.json"
    stray.write_text("{}")

    problems = verify_cluster_records(gate.home.root)

    assert problems == ["promotions/2026-01-01-stray.json: record file is not in the ledger"]



async def test_a_decision_whose_ledger_entry_was_lost_is_completed_from_its_record(
    gate: Gate, monkeypatch: pytest.MonkeyPatch
) -> None:
    service, request_id = await _pending(gate)
    ledger = gate.ledger
    real_append = ledger.append

    def disk_gone(event: Any) -> Any:
        if isinstance(event, PromotionApproved):
            raise Unavailable("disk gone")
        return real_append(event)

    monkeypatch.setattr(ledger, "append", disk_gone)
    with pytest.raises(Unavailable):
        await gate.decide(service, request_id)
    monkeypatch.undo()
    assert gate.runtime is not None and gate.runtime.pending_promotion == request_id

    decided = await gate.decide(service, request_id, "bob")  # any later call finishes it

    assert decided.status == "approved" and decided.approvals == ["alice"]
    assert gate.runtime.champion == "iter-1"
    assert verify_cluster_records(gate.home.root) == []


async def test_one_key_listed_under_several_names_approves_only_once(
    tmp_path: Path, keys: dict[str, Reviewer]
) -> None:
    gate = Gate(tmp_path, keys, required_approvals=2)
    allow_signers(gate.home.home, f"eve,eve2 {keys['mallory'].public_line}",
                  f"bob {keys['bob'].public_line}")
    gate.home.trained_candidate()
    service = gate.start()
    requested = await service.request(CLUSTER, ME)

    def signed() -> tuple[str, str]:
        statement = gate.statement(service, requested.request_id)
        return statement.decode(), keys["mallory"].sign(statement)

    first = await service.decide(CLUSTER, requested.request_id, *signed(), "eve")
    assert first.status == "pending"
    with pytest.raises(ConflictError) as caught:
        await service.decide(CLUSTER, requested.request_id, *signed(), "eve2")
    assert caught.value.data["key_fingerprint"].startswith("SHA256:")
    assert gate.runtime is not None and gate.runtime.champion is None
    assert gate.ledger.last_of(PromotionApproved) is None
