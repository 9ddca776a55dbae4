"""A cluster's state, reduced from its ledger: the one place phase, iteration, champion,
candidate, last eval, pending promotion and the loop's record are decided.

:func:`apply` is pure: ``(state, event) -> state``. The runtime replays the ledger through it at
start and applies every later append through it under the ledger's lock
(:meth:`~modelsmith.loop.records.ledger.Ledger.replay`), so what the daemon shows is always what
the ledger says; no service assigns any of these fields.

The phase is derived, in this order: a pending promotion (``awaiting_approval``), a running
training job (``training``), a running eval (``evaluating``), else the loop's own state when it
is not idle (``diagnosing``, ``paused``, ``failed`` ...), else ``idle``. So a loop paused while
its eval runs shows ``evaluating`` until that eval's end is recorded, then ``paused``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from modelsmith.loop.records.events import (
    AdapterChecked,
    EvalFailed,
    EvalFinished,
    EvalStarted,
    IterationAdvanced,
    JudgeChecked,
    LedgerEvent,
    LoopTransition,
    PromotionApproved,
    PromotionRejected,
    PromotionRequested,
    RollbackDone,
    RunCounters,
    ScenariosChanged,
    TrainFailed,
    TrainStarted,
)
from modelsmith.loop.records.ledger import Recorded

__all__ = ["ClusterState", "LoopRecord", "LoopState", "apply", "reduce"]


class LoopState(enum.StrEnum):
    """The supervisor's states (also the values a cluster's phase can take)."""

    IDLE = "idle"
    EVALUATING = "evaluating"
    DIAGNOSING = "diagnosing"
    TRAINING = "training"
    AWAITING_APPROVAL = "awaiting_approval"
    PAUSED = "paused"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class LoopRecord:
    """The loop as its last ``loop.transition`` left it."""

    state: LoopState = LoopState.IDLE
    active: bool = False
    reason: str = ""
    paused_from: LoopState | None = None
    run: RunCounters = field(default_factory=RunCounters)




@dataclass(frozen=True, slots=True)
class ClusterState:
    """Everything the ledger says about a cluster right now."""

    seq: int = -1  # the last event applied
    iteration: int = 0
    champion: str | None = None
    champion_eval_tag: str | None = None  # the eval that made the champion
    candidate: str | None = None
    last_eval_tag: str | None = None
    pending_promotion: str | None = None
    running_evals: Mapping[str, EvalStarted] = field(default_factory=lambda: MappingProxyType({}))
    running_trains: Mapping[str, TrainStarted] = field(default_factory=lambda: MappingProxyType({}))
    scenario_versions: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    loop: LoopRecord = field(default_factory=LoopRecord)
    # The last canary check of each adapter: "verified", "unverified" or "failed".
    adapter_checks: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # The latest judge.checked of each judge identity (engine + model, template, calibration set).
    judge_checks: Mapping[str, JudgeChecked] = field(default_factory=lambda: MappingProxyType({}))

    def adapter_failed_check(self, adapter: str) -> bool:
        """True when ``adapter``'s last canary check failed (it must not be served)."""
        return self.adapter_checks.get(adapter) == "failed"

    @property
    def phase(self) -> LoopState:
        if self.pending_promotion is not None:
            return LoopState.AWAITING_APPROVAL
        if self.running_trains:
            return LoopState.TRAINING
        if self.running_evals:
            return LoopState.EVALUATING
        loop = self.loop.state
        if loop == LoopState.AWAITING_APPROVAL:  # decided; the supervisor moves on next
            return LoopState.IDLE
        return loop


def _with(mapping: Mapping[str, object], key: str, value: object) -> MappingProxyType[str, object]:
    return MappingProxyType({**mapping, key: value})


def _without(mapping: Mapping[str, object], key: str) -> MappingProxyType[str, object]:
    return MappingProxyType({k: v for k, v in mapping.items() if k != key})


def apply(state: ClusterState, recorded: Recorded[LedgerEvent]) -> ClusterState:
    """The state after one more event (pure)."""
    event = recorded.event
    state = replace(state, seq=recorded.seq)
    match event:
        case EvalStarted():
            return replace(state, running_evals=_with(state.running_evals, event.job_id, event))  # type: ignore[arg-type]
        case EvalFinished() if not event.own_evidence():
            # A named engine's eval is a comparison, a synthetic one reported apart: never the
            # cluster's own evidence (nor the previous eval regressions are counted against).
            return replace(state, running_evals=_without(state.running_evals, event.job_id))  # type: ignore[arg-type]
        case EvalFinished():
            return replace(state, last_eval_tag=event.tag,
                           running_evals=_without(state.running_evals, event.job_id))  # type: ignore[arg-type]
        case EvalFailed():
            return replace(state, running_evals=_without(state.running_evals, event.job_id))  # type: ignore[arg-type]
        case TrainStarted():
            return replace(state, running_trains=_with(state.running_trains, event.job_id, event))  # type: ignore[arg-type]
        case TrainFailed():
            return replace(state, running_trains=_without(state.running_trains, event.job_id))  # type: ignore[arg-type]
        case IterationAdvanced():
            return replace(state, iteration=event.iteration, candidate=event.adapter,
                           running_trains=_without(state.running_trains, event.train_job))  # type: ignore[arg-type]
        case PromotionRequested():
            return replace(state, pending_promotion=event.request_id)
        case PromotionApproved():
            candidate = None if state.candidate == event.adapter else state.candidate
            return replace(state, pending_promotion=None, champion=event.adapter,
                           champion_eval_tag=event.eval_tag, candidate=candidate)
        case PromotionRejected():
            return replace(state, pending_promotion=None)
        case RollbackDone():
            return replace(state, champion=event.adapter, champion_eval_tag=event.eval_tag)
        case ScenariosChanged():
            return replace(state, scenario_versions=MappingProxyType(dict(event.versions)))
        case AdapterChecked():
            return replace(state, adapter_checks=_with(state.adapter_checks, event.adapter,  # type: ignore[arg-type]
                                                       event.status))
        case JudgeChecked():
            return replace(state, judge_checks=_with(state.judge_checks, event.identity, event))  # type: ignore[arg-type]
        case LoopTransition():
            paused_from = LoopState(event.paused_from) if event.paused_from else None
            return replace(state, loop=LoopRecord(state=LoopState(event.to), active=event.active,
                                                  reason=event.reason, paused_from=paused_from,
                                                  run=event.run))
    return state


def reduce(events: Iterable[Recorded[LedgerEvent]],
           initial: ClusterState | None = None) -> ClusterState:
    """Fold ``events`` (oldest first) into a state."""
    state = initial if initial is not None else ClusterState()
    for recorded in events:
        state = apply(state, recorded)
    return state
