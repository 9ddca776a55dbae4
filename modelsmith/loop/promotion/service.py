"""The promotion gate: signed requests, human decisions by SSH signature, rollback.

Flow (every step is a ledger event; the ledger is what a restarted daemon resumes from)::

    policy.check ──► promote.request ──► promotion.requested   (phase awaiting_approval)
                                   │
          promote.decide (approve) ├─► promotion.signed      (fewer than required_approvals)
                                   ├─► promotion.approved    (champion = candidate, served)
          promote.decide (reject)  └─► promotion.rejected    (phase idle: back to the loop)
    promote.rollback ──────────────────► rollback.done        (champion = an earlier approved one)

Records (request, decision, rollback) are JSON objects signed with the daemon's Ed25519 key and
written once (``create_exclusive``) under ``<cluster>/promotions/``; their ledger entries hold
each file's sha256 (see :mod:`modelsmith.loop.promotion.record_files`).

Who may decide: only a holder of a private SSH key listed in ``<home>/allowed_signers``. The
daemon checks the reviewer's SSHSIG signature over an approval statement that names the
request's digest (:mod:`modelsmith.loop.records.approval`); it never sees a reviewer's key. Nonces of
honoured statements live in the ledger, so a replay is refused across restarts too. The MCP
server does not expose ``promote.decide`` or ``promote.rollback``; even if a client called them,
no agent holds a listed key.

Concurrency: one lock per cluster serialises requests, decisions and rollbacks; file and ledger
work runs in worker threads.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import msgspec
import structlog

from modelsmith.atomic import create_exclusive
from modelsmith.clock import utc_now, utc_stamp
from modelsmith.errors import (
    ConflictError,
    EngineError,
    GateFailed,
    ModelsmithError,
    SignatureError,
    ValidationError,
)
from modelsmith.gpu.engines import EnginePool
from modelsmith.gpu.model_identity import base_model_identity
from modelsmith.hashing import sha256_hex
from modelsmith.loop.cluster.fleet import ClusterRuntime, Fleet
from modelsmith.loop.promotion.policy import TRAINING_MANIFEST, check_policy, iteration_of
from modelsmith.loop.promotion.record_files import PROMOTIONS_DIR, encode_record
from modelsmith.loop.promotion.records import (
    AdapterRef,
    ChampionRef,
    DecisionRecord,
    EvalRef,
    ModelRef,
    PolicyTerms,
    PromotionRequestRecord,
    Requester,
    RequesterRef,
    RollbackRecord,
    RollbackSide,
    TrainingManifestRef,
    read_record,
    record_to_sign,
)
from modelsmith.loop.promotion.state import (
    RequestState,
    promotion_history,
    promotion_view,
    request_state,
    rollback_target,
    seen_nonces,
)
from modelsmith.loop.records.approval import VerifiedApproval, verify_approval
from modelsmith.loop.records.events import (
    ApprovalItem,
    PromotionApproved,
    PromotionRejected,
    PromotionSigned,
)
from modelsmith.loop.records.events import PromotionRequested as PromotionRequestedEvent
from modelsmith.loop.records.events import RollbackDone as RollbackDoneEvent
from modelsmith.loop.records.signing import DaemonKey, verify_record
from modelsmith.loop.train.hot_load import CheckContext, load_verified, require_not_failed
from modelsmith.rpc.dispatch import MethodTable
from modelsmith.rpc.schema.promotion import (
    BundleExported,
    BundleExportParams,
    PolicyCheckParams,
    PolicyReport,
    PromoteDecideParams,
    PromoteGetParams,
    PromoteHistoryParams,
    PromoteRequestParams,
    PromoteRollbackParams,
    PromotionDecided,
    PromotionHistory,
    PromotionRequested,
    PromotionView,
    RequestStatus,
    RollbackDone,
)
from modelsmith.rpc.server import CallContext

__all__ = ["ALLOWED_SIGNERS", "PromotionService", "Requester"]

ALLOWED_SIGNERS = "allowed_signers"
SERVE_TIMEOUT_S = 300.0

log = structlog.get_logger("modelsmith.promotion")


@dataclass
class _Outcome:
    """A decision or rollback done on disk and in the ledger; the adapter to serve, if any."""

    result: Any
    serve: tuple[str, Path] | None


class PromotionService:
    """policy.check, promote.*, bundle.export: the gate between the loop and production."""

    def __init__(
        self,
        fleet: Fleet,
        engines: EnginePool | None,
        home: Path,
        *,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.fleet = fleet
        self.engines = engines
        self.home = Path(home)
        self._clock = clock
        self._key: DaemonKey | None = None
        self._locks: dict[str, anyio.Lock] = {}

    @property
    def allowed_signers_path(self) -> Path:
        return self.home / ALLOWED_SIGNERS

    def key(self) -> DaemonKey:
        """The daemon's signing key, created in ``<home>/keys`` on first use."""
        if self._key is None:
            self._key = DaemonKey.load_or_create(self.home / "keys")
        return self._key

    def _lock(self, cluster: str) -> anyio.Lock:
        return self._locks.setdefault(cluster, anyio.Lock())

    # -- public async API (what the RPC handlers call) ----------------------------------------
    async def policy_check(self, cluster: str, eval_tag: str | None = None) -> PolicyReport:
        """Every gate rule's outcome for the cluster's candidate; changes nothing."""
        runtime = self.fleet.get(cluster)
        evidence = await anyio.to_thread.run_sync(check_policy, runtime, eval_tag)
        return evidence.report

    async def request(self, cluster: str, requester: Requester, *, eval_tag: str | None = None,
                      note: str | None = None) -> PromotionRequested:
        """Write a signed promotion request; GateFailed (with every check in data) otherwise."""
        runtime = self.fleet.get(cluster)
        async with self._lock(cluster):
            return await anyio.to_thread.run_sync(
                lambda: self._request(runtime, requester, eval_tag, note))

    async def get(self, cluster: str, request_id: str) -> PromotionView:
        runtime = self.fleet.get(cluster)
        return await anyio.to_thread.run_sync(promotion_view, runtime, request_id)

    async def history(self, cluster: str) -> PromotionHistory:
        runtime = self.fleet.get(cluster)
        return await anyio.to_thread.run_sync(promotion_history, runtime)

    async def decide(self, cluster: str, request_id: str, statement: str, signature: str,
                     principal: str | None = None) -> PromotionDecided:
        """Apply a reviewer's signed approve/reject statement (see module doc)."""
        runtime = self.fleet.get(cluster)
        async with self._lock(cluster):
            outcome = await anyio.to_thread.run_sync(
                lambda: self._decide(runtime, request_id, statement, signature, principal))
            result: PromotionDecided = outcome.result
            if outcome.serve is not None:
                result.engine = await self._serve(cluster, *outcome.serve, context="approval")
            return result

    async def rollback(self, cluster: str, statement: str, signature: str,
                       principal: str | None = None) -> RollbackDone:
        """Make an earlier approved iteration the champion again, on a reviewer's signature."""
        runtime = self.fleet.get(cluster)
        async with self._lock(cluster):
            outcome = await anyio.to_thread.run_sync(
                lambda: self._rollback(runtime, statement, signature, principal))
            result: RollbackDone = outcome.result
            # The base model needs no adapter: every engine serves it without one.
            result.engine = (await self._serve(cluster, *outcome.serve, context="rollback")
                             if outcome.serve is not None else "serving")
            return result

    async def export_bundle(self, cluster: str, request_id: str) -> BundleExported:
        """Write ``<cluster>/bundles/<request_id>/`` (index.html + bundle.tar.gz)."""
        from modelsmith.loop.promotion.bundle import build_bundle

        runtime = self.fleet.get(cluster)
        ledger = runtime.require_ledger()
        request_state(ledger, request_id)  # NotFound early, before any work
        async with self._lock(cluster):
            # matplotlib and tar work: never on the event loop.
            built = await anyio.to_thread.run_sync(
                lambda: build_bundle(runtime.cluster, ledger.recorded(), request_id, self.key()))
        return BundleExported(cluster=cluster, request_id=request_id,
                              directory=str(built.directory), html=str(built.html),
                              tarball=str(built.tarball), tarball_sha256=built.tarball_sha256,
                              files=built.files)

    async def restore_champions(self) -> None:
        """Load every cluster's recorded champion into its engine, checked by its canaries
        (context "restart"): a restarted daemon serves what the ledger says, verified. Runs in
        the daemon's task group; failures are logged and recorded, never raised."""
        if self.engines is None:
            return
        for name, runtime in sorted(self.fleet.runtimes.items()):
            champion = runtime.champion
            if champion is None:
                continue
            state = await self._serve(name, champion, runtime.adapter_path(champion),
                                      context="restart")
            log.info("champion restored", cluster=name, adapter=champion, engine=state)

    async def _serve(self, cluster: str, adapter: str, path: Path, *,
                     context: CheckContext) -> str:
        """Load the new champion into the cluster's engine and check its canaries; the ledger
        already decided (a failed check is recorded as adapter.checked and reported here)."""
        if self.engines is None:
            return "off"
        try:
            self.engines.engine_for(cluster)
        except EngineError:
            return "off"
        try:
            with anyio.fail_after(SERVE_TIMEOUT_S):
                await load_verified(self.fleet.get(cluster), self.engines, adapter, path, context)
        except (ModelsmithError, TimeoutError) as exc:
            message = exc.message if isinstance(exc, ModelsmithError) else "timed out"
            log.warning("champion not loaded into the engine", cluster=cluster,
                        adapter=adapter, error=message)
            return f"error: {message}"
        return "serving"

    def _load_request_record(self, runtime: ClusterRuntime, requested: PromotionRequestedEvent
                             ) -> PromotionRequestRecord:
        """The request record, refused unless its bytes and daemon signature are untouched."""
        path = runtime.cluster.root / requested.file
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise SignatureError(f"promotion record {requested.file} is missing",
                                 data={"reason": "tampered", "file": str(path)}) from None
        if sha256_hex(data) != requested.sha256:
            raise SignatureError(
                f"promotion record {requested.file} was altered after it was written",
                data={"reason": "tampered", "file": str(path)})
        try:
            record = json.loads(data)
        except ValueError as exc:
            raise SignatureError("promotion record is not JSON",
                                 data={"reason": "tampered", "file": str(path)}) from exc
        verify_record(record, self.key().public_key_b64)
        try:
            typed: PromotionRequestRecord = read_record(record, PromotionRequestRecord)
        except msgspec.ValidationError as exc:
            raise SignatureError(f"promotion record is not a request record: {exc}",
                                 data={"reason": "tampered", "file": str(path)}) from exc
        return typed

    def _verify(self, runtime: ClusterRuntime, statement: str, signature: str,
                digest: str | None, principal: str | None) -> VerifiedApproval:
        ledger = runtime.require_ledger()
        return verify_approval(
            statement.encode("utf-8"), signature, self.allowed_signers_path,
            expect_cluster=runtime.cluster.name, expect_request_digest=digest,
            seen_nonces=seen_nonces(ledger), now=self._clock(), principal=principal)

    def _write_record(self, runtime: ClusterRuntime, relative: str,
                      record: PromotionRequestRecord | DecisionRecord | RollbackRecord) -> str:
        """Sign and write a record once; returns the sha256 of its bytes."""
        data = encode_record(self.key().sign_record(record_to_sign(record)))
        try:
            create_exclusive(runtime.cluster.root / relative, data, mode=0o644)
        except FileExistsError:
            raise ConflictError(f"record {relative} exists already; records are never "
                                "overwritten", data={"file": relative}) from None
        return sha256_hex(data)

    # -- promote.request ------------------------------------------------------------------------
    def _request(self, runtime: ClusterRuntime, requester: Requester, eval_tag: str | None,
                 note: str | None) -> PromotionRequested:
        runtime.require_ledger()
        if runtime.pending_promotion is not None:
            raise ConflictError(f"request {runtime.pending_promotion} of {runtime.cluster.name} "
                                "awaits a decision; approve or reject it first",
                                data={"request_id": runtime.pending_promotion})
        if runtime.candidate is not None:
            require_not_failed(runtime, runtime.candidate)
        evidence = check_policy(runtime, eval_tag)
        report = evidence.report
        if not report.passed:
            failed = [c.check for c in report.checks if not c.passed]
            raise GateFailed(
                f"promotion gate failed for {runtime.cluster.name}: {', '.join(failed)}",
                data={"cluster": runtime.cluster.name, "eval_tag": report.eval_tag,
                      "failed": failed, "checks": msgspec.to_builtins(report.checks)})
        summary = evidence.summary
        candidate = runtime.candidate
        assert summary is not None and candidate is not None
        assert evidence.adapter_sha256 is not None and evidence.training_manifest is not None
        config = runtime.cluster.config
        now = self._clock()
        iteration = iteration_of(candidate)
        request_id = f"iter-{iteration}-{secrets.token_hex(4)}"
        relative = f"{PROMOTIONS_DIR}/{utc_stamp(now)[:10]}-{request_id}.json"
        adapter_path = runtime.adapter_path(candidate)
        record = PromotionRequestRecord(
            request_id=request_id, cluster=runtime.cluster.name, created_at=utc_stamp(now),
            requested_by=RequesterRef(uid=requester.uid, username=requester.username,
                                      pid=requester.pid),
            note=note,
            model=ModelRef(name=runtime.cluster.model_name,
                           base_model=str(runtime.cluster.base_model),
                           base_model_sha256=_base_identity(runtime, evidence.training_manifest)),
            iteration=iteration,
            adapter=AdapterRef(name=candidate, path=str(adapter_path),
                               sha256=evidence.adapter_sha256),
            eval=EvalRef(tag=summary.tag, type=summary.type, quick=summary.quick,
                         summary_sha256=evidence.summary_sha256,
                         results_sha256=summary.results_sha256, composite=summary.composite,
                         held_out=summary.held_out, scenarios=summary.scenarios),
            scenario_sets=dict(summary.scenario_sets),
            training_manifest=TrainingManifestRef(
                path=f"adapters/{candidate}/{TRAINING_MANIFEST}",
                sha256=evidence.training_manifest_sha256,
                job_id=evidence.training_manifest.get("job_id"),
                source_eval_tag=evidence.training_manifest.get("eval_tag")),
            champion=ChampionRef(adapter=evidence.champion, eval_tag=evidence.champion_eval_tag),
            regressions=evidence.extra.get("regressions"),
            policy=PolicyTerms(composite_threshold=config.thresholds.composite,
                               held_out_threshold=config.thresholds.held_out,
                               max_regressions=config.policy.max_regressions,
                               required_approvals=config.policy.required_approvals),
            gate=list(report.checks),
        )
        digest = self._write_record(runtime, relative, record)
        runtime.record(PromotionRequestedEvent(
            request_id=request_id, file=relative, sha256=digest, iteration=iteration,
            adapter=candidate, adapter_sha256=evidence.adapter_sha256, eval_tag=summary.tag,
            summary_sha256=evidence.summary_sha256 or "", requested_by_uid=requester.uid))
        log.info("promotion requested", cluster=runtime.cluster.name, request_id=request_id,
                 adapter=candidate, eval_tag=summary.tag)
        name = runtime.cluster.name
        return PromotionRequested(
            request_id=request_id, cluster=name, model=runtime.cluster.model_name,
            base_model=str(runtime.cluster.base_model), iteration=iteration, adapter=candidate,
            adapter_path=str(adapter_path), adapter_sha256=evidence.adapter_sha256,
            eval_tag=summary.tag, composite=summary.composite, held_out=summary.held_out,
            directory=str(runtime.cluster.root / PROMOTIONS_DIR) + "/",
            file=relative.rsplit("/", 1)[1], sha256=digest,
            required_approvals=config.policy.required_approvals,
            approve_command=f"modelsmith approve {name} {request_id}",
            reject_command=f"modelsmith reject {name} {request_id} --reason '...'",
        )

    # -- promote.decide ------------------------------------------------------------------------
    def _decide(self, runtime: ClusterRuntime, request_id: str, statement: str, signature: str,
                principal: str | None) -> _Outcome:
        ledger = runtime.require_ledger()
        state = request_state(ledger, request_id)
        if state.status != "pending":
            raise ConflictError(f"promotion request {request_id} was {state.status} already",
                                data={"request_id": request_id, "status": state.status})
        record = self._load_request_record(runtime, state.requested.event)
        decision_relative = state.requested.event.file.removesuffix(".json") + ".decision.json"
        if (runtime.cluster.root / decision_relative).exists():
            return self._recover_decision(runtime, state, decision_relative)
        verified = self._verify(runtime, statement, signature, state.requested.event.sha256,
                                principal)
        said = verified.statement
        if said.decision not in ("approve", "reject"):
            raise ValidationError(f"a {said.decision} statement cannot decide a promotion request",
                                  data={"field": "statement.decision"})
        if said.request_id != request_id:
            raise SignatureError("statement is for another promotion request",
                                 data={"reason": "digest_mismatch", "request_id": said.request_id})
        item = ApprovalItem(principal=verified.principal, key_fingerprint=verified.key_fingerprint,
                            decision=said.decision, reason=said.reason, time=said.time,
                            nonce=said.nonce, statement=statement, signature=signature)
        required = record.policy.required_approvals
        if said.decision == "approve":
            # Keys, not principals: one key on a line `*@corp.example <key>` (or `eve,eve2
            # <key>`) would otherwise approve as many times as it has names.
            if any(prior.key_fingerprint == verified.key_fingerprint for prior in state.signed):
                raise ConflictError(f"the key {verified.key_fingerprint} approved {request_id} "
                                    f"already (as {verified.principal}); {required} distinct "
                                    "reviewer keys are needed",
                                    data={"request_id": request_id,
                                          "principal": verified.principal,
                                          "key_fingerprint": verified.key_fingerprint})
            approvals = [*state.signed, item]
            if len(approvals) < required:
                runtime.record(PromotionSigned(request_id=request_id, **msgspec.structs.asdict(item)))
                return _Outcome(self._decided(runtime, request_id, "pending", verified.principal,
                                              approvals, required, None), None)
            return self._finish(runtime, state, record, decision_relative, "approved", approvals,
                                verified.principal, reason=None)
        return self._finish(runtime, state, record, decision_relative, "rejected", [item],
                            verified.principal, reason=said.reason)

    def _decided(self, runtime: ClusterRuntime, request_id: str, status: RequestStatus,
                 principal: str, approvals: list[ApprovalItem], required: int,
                 decision_file: str | None) -> PromotionDecided:
        return PromotionDecided(
            cluster=runtime.cluster.name, request_id=request_id, status=status,
            principal=principal,
            approvals=[a.principal for a in approvals if a.decision == "approve"],
            required_approvals=required, decision_file=decision_file, champion=runtime.champion,
            engine="unchanged")

    def _finish(self, runtime: ClusterRuntime, state: RequestState,
                record: PromotionRequestRecord, decision_relative: str, status: RequestStatus,
                approvals: list[ApprovalItem], principal: str, *, reason: str | None) -> _Outcome:
        requested = state.requested.event
        decision = DecisionRecord(
            cluster=runtime.cluster.name, request_id=requested.request_id, decision=status,
            reason=reason, request_file=requested.file, request_sha256=requested.sha256,
            iteration=record.iteration, adapter=record.adapter, eval_tag=record.eval.tag,
            approvals=approvals, required_approvals=record.policy.required_approvals,
            decided_at=utc_stamp(self._clock()))
        digest = self._write_record(runtime, decision_relative, decision)
        return self._apply_decision(runtime, decision, decision_relative, digest, principal)

    def _apply_decision(self, runtime: ClusterRuntime, decision: DecisionRecord,
                        decision_relative: str, digest: str, principal: str) -> _Outcome:
        approvals = decision.approvals
        adapter = decision.adapter.name
        principals = [a.principal for a in approvals]
        nonces = [a.nonce for a in approvals]
        serve: tuple[str, Path] | None = None
        if decision.decision == "approved":
            runtime.record(PromotionApproved(
                request_id=decision.request_id, adapter=adapter,
                adapter_sha256=decision.adapter.sha256, iteration=decision.iteration,
                eval_tag=decision.eval_tag, principals=principals, nonces=nonces,
                decision_file=decision_relative, sha256=digest))
            serve = (adapter, runtime.adapter_path(adapter))
        else:
            runtime.record(PromotionRejected(
                request_id=decision.request_id, adapter=adapter,
                adapter_sha256=decision.adapter.sha256, iteration=decision.iteration,
                eval_tag=decision.eval_tag, principals=principals, nonces=nonces,
                decision_file=decision_relative, sha256=digest, reason=decision.reason))
        log.info("promotion decided", cluster=runtime.cluster.name,
                 request_id=decision.request_id, decision=decision.decision, principals=principals)
        status: RequestStatus = "approved" if decision.decision == "approved" else "rejected"
        result = self._decided(runtime, decision.request_id, status, principal, approvals,
                               decision.required_approvals, decision_relative)
        return _Outcome(result, serve)

    def _recover_decision(self, runtime: ClusterRuntime, state: RequestState,
                          decision_relative: str) -> _Outcome:
        """Finish a decision whose record was written but whose ledger entry a crash lost."""
        data = (runtime.cluster.root / decision_relative).read_bytes()
        raw = json.loads(data)
        verify_record(raw, self.key().public_key_b64)
        decision: DecisionRecord = read_record(raw, DecisionRecord)
        if decision.request_sha256 != state.requested.event.sha256:
            raise SignatureError(f"{decision_relative} is not the decision of this request",
                                 data={"reason": "tampered", "file": decision_relative})
        log.warning("completing an interrupted decision", cluster=runtime.cluster.name,
                    file=decision_relative)
        principal = decision.approvals[-1].principal
        return self._apply_decision(runtime, decision, decision_relative, sha256_hex(data),
                                    principal)

    # -- promote.rollback ------------------------------------------------------------------------
    def _rollback(self, runtime: ClusterRuntime, statement: str, signature: str,
                  principal: str | None) -> _Outcome:
        runtime.require_ledger()
        verified = self._verify(runtime, statement, signature, None, principal)
        said = verified.statement
        if said.decision != "rollback" or said.to_iteration is None:
            raise ValidationError("promote.rollback needs a rollback statement",
                                  data={"field": "statement.decision"})
        to_iteration = said.to_iteration
        champion = runtime.champion
        current = iteration_of(champion) if champion else None
        if current is None:
            raise ConflictError(f"{runtime.cluster.name} serves the base model: there is nothing "
                                "earlier to roll back to", data={"to_iteration": to_iteration})
        if to_iteration >= current:
            raise ConflictError(f"iteration {to_iteration} is not earlier than the champion "
                                f"{champion}", data={"to_iteration": to_iteration})
        adapter, adapter_sha256, request_id, eval_tag = rollback_target(runtime, to_iteration)
        now = self._clock()
        rollback_id = f"to-iter-{to_iteration}-{secrets.token_hex(4)}"
        relative = f"{PROMOTIONS_DIR}/{utc_stamp(now)[:10]}-rollback-{rollback_id}.json"
        record = RollbackRecord(
            cluster=runtime.cluster.name, rollback_id=rollback_id, created_at=utc_stamp(now),
            from_=RollbackSide(adapter=champion, iteration=current),
            to=RollbackSide(adapter=adapter, iteration=to_iteration, request_id=request_id,
                            eval_tag=eval_tag, adapter_sha256=adapter_sha256),
            principal=verified.principal, key_fingerprint=verified.key_fingerprint,
            reason=said.reason, nonce=said.nonce, statement=statement, signature=signature,
            daemon_pid=os.getpid())
        digest = self._write_record(runtime, relative, record)
        runtime.record(RollbackDoneEvent(
            rollback_id=rollback_id, adapter=adapter, to_iteration=to_iteration,
            from_adapter=champion, eval_tag=eval_tag, adapter_sha256=adapter_sha256,
            principal=verified.principal, nonce=said.nonce, file=relative, sha256=digest))
        log.info("rolled back", cluster=runtime.cluster.name, to=adapter or "base",
                 previous=champion, principal=verified.principal)
        result = RollbackDone(cluster=runtime.cluster.name, rollback_id=rollback_id,
                              adapter=adapter, to_iteration=to_iteration,
                              previous_champion=champion, principal=verified.principal,
                              file=relative, engine="unchanged")
        serve = (adapter, runtime.adapter_path(adapter)) if adapter is not None else None
        return _Outcome(result, serve)

    # -- RPC -------------------------------------------------------------------------------------
    def register(self, table: MethodTable) -> None:
        """Add policy.check, promote.{request,get,history,decide,rollback} and bundle.export."""
        self.key()  # created on first start, before the daemon says READY

        async def policy_check(params: PolicyCheckParams, ctx: CallContext) -> PolicyReport:
            return await self.policy_check(params.cluster, params.eval_tag)

        async def promote_request(params: PromoteRequestParams, ctx: CallContext
                                  ) -> PromotionRequested:
            requester = Requester.of(ctx.peer.uid, ctx.peer.pid)
            return await self.request(params.cluster, requester, eval_tag=params.eval_tag,
                                      note=params.note)

        async def promote_get(params: PromoteGetParams, ctx: CallContext) -> PromotionView:
            return await self.get(params.cluster, params.request_id)

        async def promote_history(params: PromoteHistoryParams, ctx: CallContext
                                  ) -> PromotionHistory:
            return await self.history(params.cluster)

        async def promote_decide(params: PromoteDecideParams, ctx: CallContext
                                 ) -> PromotionDecided:
            return await self.decide(params.cluster, params.request_id, params.statement,
                                     params.signature, params.principal)

        async def promote_rollback(params: PromoteRollbackParams, ctx: CallContext
                                   ) -> RollbackDone:
            return await self.rollback(params.cluster, params.statement, params.signature,
                                       params.principal)

        async def bundle_export(params: BundleExportParams, ctx: CallContext) -> BundleExported:
            return await self.export_bundle(params.cluster, params.request_id)

        table.add("policy.check", PolicyCheckParams, policy_check,
                  "Judge the candidate against the promotion policy; every reason.")
        table.add("promote.request", PromoteRequestParams, promote_request,
                  "Write a signed promotion request if the gate passes.")
        table.add("promote.get", PromoteGetParams, promote_get,
                  "A promotion request's record, exact bytes and status.")
        table.add("promote.history", PromoteHistoryParams, promote_history,
                  "Requests, approved champions and the default rollback target.")
        table.add("promote.decide", PromoteDecideParams, promote_decide,
                  "A reviewer's SSH-signed approve/reject (CLI only; never exposed to MCP).")
        table.add("promote.rollback", PromoteRollbackParams, promote_rollback,
                  "A reviewer's SSH-signed rollback to an earlier approved iteration.")
        table.add("bundle.export", BundleExportParams, bundle_export,
                  "Write the evidence bundle (index.html + bundle.tar.gz) of a request.")


def _base_identity(runtime: ClusterRuntime, manifest: dict[str, Any] | None) -> str | None:
    """The base model the adapter was trained on, by content: the training manifest's hash
    (recorded when training began), else the base directory's hash now."""
    recorded = (manifest or {}).get("base_model_sha256")
    if isinstance(recorded, str):
        return recorded
    identity = base_model_identity(runtime.cluster.base_model)
    return identity.sha256 if identity else None
