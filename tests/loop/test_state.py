"""The cluster state is a pure reduction of the ledger's events; the loop's moves are a table."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import msgspec
import pytest

from modelsmith.loop.autonomy.supervisor import IllegalTransition, plan_transition
from modelsmith.loop.cluster.state import ClusterState, LoopRecord, LoopState, apply, reduce
from modelsmith.loop.records.events import (
    EvalFinished,
    EvalStarted,
    IterationAdvanced,
    LedgerEvent,
    LoopTransition,
    PromotionApproved,
    PromotionRequested,
    RollbackDone,
    RunCounters,
    SynthFinished,
    TrainFailed,
    TrainStarted,
    error_info,
)
from modelsmith.loop.records.ledger import Ledger, Recorded

S = LoopState


def _recorded(events: list[LedgerEvent]) -> list[Recorded[LedgerEvent]]:
    return [Recorded(seq, f"2026-12-01T00:00:{seq:02d}.000000Z", e) for seq, e in enumerate(events)]


def _states(events: list[LedgerEvent]) -> list[ClusterState]:
    state, seen = ClusterState(), []
    for recorded in _recorded(events):
        state = apply(state, recorded)
        seen.append(state)
    return seen


def _move(frm: str, to: str, reason: str = "", paused_from: str | None = None) -> LoopTransition:
    return LoopTransition(from_=frm, to=to, reason=reason, active=True, paused_from=paused_from,
                          run=RunCounters(day="2026-12-01"))


EVAL = EvalStarted(tag="base", job_id="j1", type="full", quick=False, scenarios=3,
                   scenario_sets={"core": "v1"})
EVAL_DONE = EvalFinished(tag="base", job_id="j1", composite=0.4, held_out=0.3, passed=False,
                         summary_sha256="a" * 64, results_sha256="b" * 64)


def test_a_loop_paused_during_its_eval_shows_paused_once_the_eval_ends() -> None:
    states = _states([
        _move("idle", "evaluating", "loop.start"),
        EVAL,
        _move("evaluating", "paused", "loop.pause", paused_from="evaluating"),
        EVAL_DONE,
        _move("paused", "paused", "next: eval base: gate not passed", paused_from="diagnosing"),
    ])
    phases = [s.phase for s in states]
    # The eval still runs after the pause: that is what the cluster is doing.
    assert phases == [S.EVALUATING, S.EVALUATING, S.EVALUATING, S.PAUSED, S.PAUSED]
    final = states[-1]
    assert final.running_evals == {} and final.last_eval_tag == "base"
    assert final.loop.state == S.PAUSED and final.loop.paused_from == S.DIAGNOSING


def test_iteration_candidate_champion_and_pending_promotion_follow_the_events() -> None:
    advanced = IterationAdvanced(iteration=1, adapter="iter-1", adapter_hash="c" * 64,
                                 train_job="t1", source_eval_tag="base",
                                 training_manifest_sha256="d" * 64, stop_reason="completed",
                                 steps=20)
    requested = PromotionRequested(request_id="r1", file="promotions/r1.json", sha256="e" * 64,
                                   iteration=1, adapter="iter-1", adapter_sha256="c" * 64,
                                   eval_tag="iter-1-full", summary_sha256="f" * 64)
    approved = PromotionApproved(request_id="r1", adapter="iter-1", adapter_sha256="c" * 64,
                                 iteration=1, eval_tag="iter-1-full", principals=["alice"],
                                 nonces=["n1"], decision_file="promotions/r1.decision.json",
                                 sha256="0" * 64)
    rollback = RollbackDone(rollback_id="x", adapter=None, to_iteration=0, from_adapter="iter-1",
                            eval_tag="base", adapter_sha256=None, principal="alice", nonce="n2",
                            file="promotions/x.json", sha256="1" * 64)
    train = TrainStarted(job_id="t1", iteration=1, eval_tag="base", scenarios=3, work_dir="w")
    states = _states([train, advanced, requested, approved, rollback])

    assert states[0].phase == S.TRAINING and "t1" in states[0].running_trains
    assert (states[1].iteration, states[1].candidate, states[1].phase) == (1, "iter-1", S.IDLE)
    assert (states[2].pending_promotion, states[2].phase) == ("r1", S.AWAITING_APPROVAL)
    assert (states[3].champion, states[3].candidate, states[3].pending_promotion) == (
        "iter-1", None, None)
    assert states[3].champion_eval_tag == "iter-1-full"
    assert (states[4].champion, states[4].champion_eval_tag) == (None, "base")


def test_a_failed_training_job_is_no_longer_running() -> None:
    train = TrainStarted(job_id="t1", iteration=1, eval_tag="base", scenarios=3, work_dir="w")
    failed = TrainFailed(job_id="t1", error=error_info("cancelled"), iteration=1)
    assert _states([train, failed])[-1].running_trains == {}


def test_synthetic_evals_and_synth_events_leave_the_clusters_evidence_alone() -> None:
    synthetic = msgspec.structs.replace(EVAL_DONE, tag="syn", job_id="j2", type="synthetic")
    synth = SynthFinished(job_id="s1", eval_tag="base", patterns=["choice/wrong_value"],
                          source_ids=["c1"], generated=3, dropped_invalid=1,
                          dropped_reference_fails=0, dropped_duplicate=1, refused_near_held_out=0,
                          kept=1, ids=["syn-1"], prompt_sha256=["0" * 64], generator="m:f")
    states = _states([EVAL_DONE, synthetic, synth])
    assert states[1].last_eval_tag == "base" and states[2].last_eval_tag == "base"
    assert dataclasses.replace(states[2], seq=states[0].seq) == states[0]


def test_the_state_kept_on_append_equals_the_state_reduced_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger.open(path)
    live: list[ClusterState] = [ClusterState()]
    ledger.replay(lambda recorded: live.append(apply(live[-1], recorded)))
    for event in (_move("idle", "evaluating", "loop.start"), EVAL, EVAL_DONE,
                  _move("evaluating", "diagnosing", "gate not passed")):
        ledger.append(event)

    assert live[-1] == reduce(Ledger.open(path).recorded())
    assert live[-1].phase == S.DIAGNOSING


# Written out here, not read from the code: the table is the specification.
LEGAL: dict[LoopState, set[LoopState]] = {
    S.IDLE: {S.EVALUATING, S.AWAITING_APPROVAL, S.PAUSED, S.FAILED},
    S.EVALUATING: {S.DIAGNOSING, S.AWAITING_APPROVAL, S.IDLE, S.PAUSED, S.FAILED},
    S.DIAGNOSING: {S.TRAINING, S.IDLE, S.PAUSED, S.FAILED},
    S.TRAINING: {S.EVALUATING, S.IDLE, S.PAUSED, S.FAILED},
    S.AWAITING_APPROVAL: {S.IDLE, S.DIAGNOSING, S.PAUSED, S.FAILED},
    S.PAUSED: {S.IDLE, S.EVALUATING, S.DIAGNOSING, S.TRAINING, S.AWAITING_APPROVAL, S.FAILED},
    S.FAILED: {S.IDLE, S.EVALUATING},
}


@pytest.mark.parametrize(("frm", "to"), [
    (f, t) for f, t in itertools.product(LoopState, LoopState) if f != t])
def test_every_supervisor_transition_is_legal_exactly_as_the_table_says(
    frm: LoopState, to: LoopState
) -> None:
    loop = LoopRecord(state=frm, active=True)
    run = RunCounters(day="2026-12-01")
    if to in LEGAL[frm]:
        event = plan_transition(loop, to, "loop.resume", active=True, run=run, paused_from=None)
        assert event is not None and (event.from_, event.to) == (frm.value, to.value)
        assert reduce(_recorded([event])).loop.state == to
    else:
        with pytest.raises(IllegalTransition) as caught:
            plan_transition(loop, to, "step", active=True, run=run, paused_from=None)
        assert caught.value.data == {"from": frm.value, "to": to.value}
        assert caught.value.code == 1003


@pytest.mark.parametrize("to", [S.EVALUATING, S.DIAGNOSING, S.TRAINING, S.AWAITING_APPROVAL])
def test_a_step_that_ends_while_paused_is_remembered_and_the_loop_stays_paused(
    to: LoopState
) -> None:
    loop = LoopRecord(state=S.PAUSED, active=True, paused_from=S.EVALUATING)
    event = plan_transition(loop, to, "eval done", active=True, run=RunCounters(),
                            paused_from=S.EVALUATING)
    assert event is not None
    state = reduce(_recorded([event]))
    assert (state.loop.state, state.loop.paused_from, state.phase) == (S.PAUSED, to, S.PAUSED)


def test_no_event_is_planned_when_nothing_changes() -> None:
    loop = LoopRecord(state=S.IDLE, active=False)
    assert plan_transition(loop, S.IDLE, "loop.stop", active=False, run=RunCounters(),
                           paused_from=None) is None


def test_the_latest_judge_check_of_each_identity_is_kept() -> None:
    from modelsmith.loop.records.events import JudgeChecked

    def checked(identity: str, kappa: float, job: str) -> JudgeChecked:
        return JudgeChecked(judge="grader", job_id=job, engine="grader", engine_model="m",
                            template_sha256="t" * 64, calibration_version="v" * 64,
                            identity=identity, examples=8, answered=8, repeats=3, pass_mark=0.6,
                            scale=5.0, exact_rate=0.5, within_one_rate=0.9, kappa=kappa,
                            spearman=0.8)

    states = _states([checked("a", 0.2, "j1"), checked("b", 0.9, "j2"), checked("a", 0.7, "j3")])
    final = states[-1]
    assert set(final.judge_checks) == {"a", "b"}
    assert final.judge_checks["a"].kappa == 0.7 and final.judge_checks["a"].job_id == "j3"
    assert states[0].phase == S.IDLE  # a check changes nothing else
