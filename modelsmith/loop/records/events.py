"""The ledger's typed events: one msgspec Struct per kind, a tagged union of all of them.

Every writer builds one of these and every reader gets one back (:meth:`Ledger.append`,
:meth:`Ledger.find`); nothing reads an entry's payload as a loose dict. On disk an entry keeps
the format it always had: ``{"seq", "ts", "kind", "data", "prev", "hash"}`` where ``kind`` is
the event's tag and ``data`` its other fields, so ledgers written before these types existed
load unchanged (``tests/loop/test_events.py`` opens one).

The kinds::

    scenarios.changed    a governed set's version changed (load, file drop, edit)
    scenarios.ingested   a dropped file joined a set
    loop.transition      the supervisor moved between states (with the run's counters)
    eval.started / eval.finished / eval.failed
    train.started / iteration.advanced / train.failed
    promotion.requested / promotion.signed / promotion.approved / promotion.rejected
    rollback.done
    adapter.checked      an adapter loaded into an engine was replayed against its canaries
    judge.checked        a judge was run on its calibration set (agreement with people, itself)
    synth.finished / synth.failed   a synthesis job: what it generated, dropped, refused, kept
    scenarios.accepted   a reviewer's SSH-signed move of synthetic scenarios into core

Field names are the stored names; new fields get defaults so that older entries still decode.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar, TypeAlias

import anyio
import msgspec

from modelsmith.errors import error_envelope

__all__ = [
    "EVENT_TYPES",
    "AdapterChecked",
    "ApprovalItem",
    "ErrorInfo",
    "EvalFailed",
    "EvalFinished",
    "EvalStarted",
    "IterationAdvanced",
    "JudgeChecked",
    "LedgerEvent",
    "LoopTransition",
    "PromotionApproved",
    "PromotionRejected",
    "PromotionRequested",
    "PromotionSigned",
    "RollbackDone",
    "RunCounters",
    "ScenariosAccepted",
    "ScenariosChanged",
    "ScenariosIngested",
    "SynthFailed",
    "SynthFinished",
    "TrainFailed",
    "TrainStarted",
    "error_info",
    "event_data",
    "event_from",
    "failure_of",
]


class _Event(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="kind"):
    """Base of every ledger event; ``kind`` is its tag."""

    KIND: ClassVar[str]


class ErrorInfo(msgspec.Struct, frozen=True):
    """An error as the ledger keeps it: the stable code and name, not only the text."""

    code: int
    name: str
    message: str
    data: dict[str, Any] = {}


_CANCELLED = ErrorInfo(code=1011, name="cancelled", message="cancelled")


def failure_of(exc: BaseException) -> ErrorInfo:
    """The one way a failure becomes ledger data (cancellation included)."""
    if isinstance(exc, asyncio.CancelledError) or _is_cancellation(exc):
        return _CANCELLED
    envelope = error_envelope(exc)
    return ErrorInfo(code=envelope["code"], name=envelope["name"], message=envelope["message"],
                     data=envelope["data"])


def _is_cancellation(exc: BaseException) -> bool:
    try:
        return isinstance(exc, anyio.get_cancelled_exc_class())
    except anyio.NoEventLoopError:  # outside an event loop nothing is cancelled
        return False


def error_info(error: ErrorInfo | str) -> ErrorInfo:
    """An old entry's plain-text error, read as an ErrorInfo (code 1000, the root's)."""
    if isinstance(error, ErrorInfo):
        return error
    if error == "cancelled":
        return _CANCELLED
    return ErrorInfo(code=1000, name="error", message=error)


# -- scenario sets -------------------------------------------------------------------------------

class ScenariosChanged(_Event, frozen=True, tag="scenarios.changed"):
    versions: dict[str, str]
    counts: dict[str, int]
    changed: list[str]


class ScenariosIngested(_Event, frozen=True, tag="scenarios.ingested"):
    file: str
    sha256: str
    set: str
    count: int
    ids: list[str]


# -- the autonomous loop -------------------------------------------------------------------------

class RunCounters(msgspec.Struct, frozen=True):
    """What one run of the loop has done; carried by every transition, so it survives restarts."""

    iterations: int = 0
    best_composite: float | None = None
    without_improvement: int = 0
    device_seconds_today: float = 0.0
    day: str = ""
    last_eval_tag: str | None = None


class LoopTransition(_Event, frozen=True, tag="loop.transition"):
    from_: str = msgspec.field(name="from")
    to: str = "idle"
    reason: str = ""
    active: bool = False
    paused_from: str | None = None
    run: RunCounters = RunCounters()


# -- evals ---------------------------------------------------------------------------------------

class EvalStarted(_Event, frozen=True, tag="eval.started"):
    tag: str
    job_id: str
    type: str
    quick: bool
    scenarios: int
    scenario_sets: dict[str, str]
    adapter: str | None = None
    adapter_hash: str | None = None
    domain: str | None = None
    log: str | None = None
    engine: str | None = None  # a named engine ([engines.NAME]); None: the cluster's own


class EvalFinished(_Event, frozen=True, tag="eval.finished"):
    tag: str
    job_id: str
    composite: float
    held_out: float | None
    passed: bool
    summary_sha256: str
    results_sha256: str
    adapter: str | None = None
    engine: str | None = None  # a named engine's eval: never promotion evidence
    type: str | None = None  # the eval's type; "synthetic" is reported apart, never evidence

    def own_evidence(self) -> bool:
        """The cluster's own eval of its governed sets: not a named engine's, not synthetic."""
        return self.engine is None and self.type != "synthetic"


class EvalFailed(_Event, frozen=True, tag="eval.failed"):
    job_id: str
    error: ErrorInfo | str
    tag: str | None = None


# -- training ------------------------------------------------------------------------------------

class TrainStarted(_Event, frozen=True, tag="train.started"):
    job_id: str
    iteration: int
    eval_tag: str
    scenarios: int
    work_dir: str
    init_adapter: str | None = None


class IterationAdvanced(_Event, frozen=True, tag="iteration.advanced"):
    iteration: int
    adapter: str
    adapter_hash: str
    train_job: str
    source_eval_tag: str
    training_manifest_sha256: str
    stop_reason: str
    steps: int


class TrainFailed(_Event, frozen=True, tag="train.failed"):
    job_id: str
    error: ErrorInfo | str
    iteration: int | None = None


# -- promotion -----------------------------------------------------------------------------------

class PromotionRequested(_Event, frozen=True, tag="promotion.requested"):
    request_id: str
    file: str
    sha256: str
    iteration: int
    adapter: str
    adapter_sha256: str
    eval_tag: str
    summary_sha256: str
    requested_by_uid: int | None = None


class ApprovalItem(msgspec.Struct, frozen=True):
    """One reviewer's verified, signed statement on a request."""

    principal: str
    key_fingerprint: str
    decision: str
    reason: str | None
    time: str
    nonce: str
    statement: str
    signature: str


class PromotionSigned(_Event, frozen=True, tag="promotion.signed"):
    """An approval while the request still needs more of them."""

    request_id: str
    principal: str
    key_fingerprint: str
    decision: str
    reason: str | None
    time: str
    nonce: str
    statement: str
    signature: str

    def item(self) -> ApprovalItem:
        return ApprovalItem(principal=self.principal, key_fingerprint=self.key_fingerprint,
                            decision=self.decision, reason=self.reason, time=self.time,
                            nonce=self.nonce, statement=self.statement, signature=self.signature)


class _Decided(_Event, frozen=True):
    """What an approval and a rejection both record."""

    request_id: str
    adapter: str
    adapter_sha256: str
    iteration: int
    eval_tag: str
    principals: list[str]
    nonces: list[str]
    decision_file: str
    sha256: str


class PromotionApproved(_Decided, frozen=True, tag="promotion.approved"):
    pass


class PromotionRejected(_Decided, frozen=True, tag="promotion.rejected"):
    reason: str | None = None


class RollbackDone(_Event, frozen=True, tag="rollback.done"):
    rollback_id: str
    adapter: str | None
    to_iteration: int
    from_adapter: str | None
    eval_tag: str | None
    adapter_sha256: str | None
    principal: str
    nonce: str
    file: str
    sha256: str


class AdapterChecked(_Event, frozen=True, tag="adapter.checked"):
    """An adapter loaded into an engine was replayed against its trainer's canaries.

    ``status``: "verified", "unverified" (no canaries.json, or an engine that cannot replay:
    recorded, not a failure) or "failed" (``error`` says which canary and why; the adapter is
    not served). ``context``: "hot_load" (after training), "approval", "rollback" or "restart".
    """

    adapter: str
    status: str
    context: str
    canaries: int = 0
    max_logprob_diff: float | None = None
    tolerance: float | None = None
    reason: str | None = None
    error: ErrorInfo | None = None


# -- synthetic scenarios --------------------------------------------------------------------------

class SynthFinished(_Event, frozen=True, tag="synth.finished"):
    """A synthesis job's outcome. Every candidate is in exactly one count: ``generated`` =
    ``dropped_invalid + dropped_reference_fails + dropped_duplicate + refused_near_held_out +
    kept``. ``teacher``/``teacher_model``: the named engine, or None with ``generator`` (a
    cluster's ``package.module:function``). ``file``: the kept scenarios' file under
    ``scenarios/synthetic/`` (None when nothing was kept)."""

    job_id: str
    eval_tag: str
    patterns: list[str]
    source_ids: list[str]
    generated: int
    dropped_invalid: int
    dropped_reference_fails: int
    dropped_duplicate: int
    refused_near_held_out: int
    kept: int
    ids: list[str]
    prompt_sha256: list[str]  # the generation prompts' hashes (provenance)
    teacher: str | None = None
    teacher_model: str | None = None
    generator: str | None = None
    file: str | None = None
    sha256: str | None = None
    near_duplicate_threshold: float | None = None


class SynthFailed(_Event, frozen=True, tag="synth.failed"):
    job_id: str
    error: ErrorInfo
    eval_tag: str | None = None


class ScenariosAccepted(_Event, frozen=True, tag="scenarios.accepted"):
    """Synthetic scenarios a reviewer accepted into core (``ids`` moved to ``file``); the
    signed statement binds ``digest`` (:func:`modelsmith.loop.synth.acceptance.acceptance_digest`)."""

    ids: list[str]
    file: str
    sha256: str
    digest: str
    principal: str
    key_fingerprint: str
    nonce: str
    statement: str
    signature: str


# -- judges ---------------------------------------------------------------------------------------

class JudgeChecked(_Event, frozen=True, tag="judge.checked"):
    """A judge was run on its calibration set ``judges/<judge>.yaml`` (docs/judges.md).

    ``identity`` is what the promotion gate asks a passing check for: the engine name and its
    model, the template's sha256 and the calibration set's version. The figures are those of
    :mod:`modelsmith.loop.eval.judge_stats`; ``report`` (relative to the cluster) holds every
    example's verdicts, ``report_sha256`` its bytes' hash.
    """

    judge: str
    job_id: str
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
    within_one_rate: float | None
    kappa: float | None
    spearman: float | None
    exact_ci95: list[float] | None = None
    within_one_ci95: list[float] | None = None
    kappa_ci95: list[float] | None = None
    spearman_ci95: list[float] | None = None
    consistency_mean_spread: float | None = None
    consistency_max_spread: float | None = None
    consistency_agreeing: float | None = None
    repeat_failures: int = 0
    order_bias: float | None = None
    report: str = ""
    report_sha256: str = ""


LedgerEvent: TypeAlias = (
    ScenariosChanged | ScenariosIngested | LoopTransition
    | EvalStarted | EvalFinished | EvalFailed
    | TrainStarted | IterationAdvanced | TrainFailed
    | PromotionRequested | PromotionSigned | PromotionApproved | PromotionRejected
    | RollbackDone | AdapterChecked
    | SynthFinished | SynthFailed | ScenariosAccepted
    | JudgeChecked
)

EVENT_TYPES: dict[str, type[_Event]] = {
    cls.__struct_config__.tag: cls  # type: ignore[misc]
    for cls in (ScenariosChanged, ScenariosIngested, LoopTransition, EvalStarted, EvalFinished,
                EvalFailed, TrainStarted, IterationAdvanced, TrainFailed, PromotionRequested,
                PromotionSigned, PromotionApproved, PromotionRejected, RollbackDone,
                AdapterChecked, SynthFinished, SynthFailed, ScenariosAccepted, JudgeChecked)
}
for _kind, _cls in EVENT_TYPES.items():
    _cls.KIND = _kind


def event_data(event: LedgerEvent) -> tuple[str, dict[str, Any]]:
    """``(kind, data)``: how an event is stored in an entry."""
    data = msgspec.to_builtins(event)
    kind = data.pop("kind")
    return kind, data


def event_from(kind: str, data: dict[str, Any]) -> LedgerEvent:
    """Decode a stored entry's payload; raises msgspec.ValidationError if it is not one."""
    event: LedgerEvent = msgspec.convert({**data, "kind": kind}, LedgerEvent)  # type: ignore[arg-type]
    return event
