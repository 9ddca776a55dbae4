"""Typed ledger events: a ledger written by the previous release loads and reduces unchanged."""

from __future__ import annotations

import shutil
from pathlib import Path

import msgspec
import pytest

from modelsmith.errors import GateFailed
from modelsmith.loop.cluster.state import LoopState, reduce
from modelsmith.loop.records.events import (
    EVENT_TYPES,
    ErrorInfo,
    EvalFailed,
    LoopTransition,
    TrainFailed,
    error_info,
    event_data,
    event_from,
    failure_of,
)
from modelsmith.loop.records.ledger import Ledger, verify_file

RELEASE_LEDGER = Path(__file__).parent / "data" / "ledger-release-0.1.jsonl"


def test_a_ledger_written_by_the_previous_release_opens_verifies_and_reduces(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.jsonl"
    shutil.copy(RELEASE_LEDGER, path)
    before = path.read_bytes()

    ledger = Ledger.open(path)
    kinds = {r.event.KIND for r in ledger.recorded()}
    state = reduce(ledger.recorded())

    assert verify_file(path).ok and path.read_bytes() == before
    # The fixture holds one of every kind that release knew; later kinds are listed here.
    assert kinds == set(EVENT_TYPES) - {"adapter.checked", "synth.finished", "synth.failed",
                                        "scenarios.accepted", "judge.checked"}
    assert state.iteration == 1 and state.candidate is None
    assert state.champion is None and state.champion_eval_tag == "base"  # rolled back to base
    assert state.pending_promotion is None
    assert state.running_evals == {} and state.running_trains == {}
    assert state.last_eval_tag == "iter-1-full-2"
    assert state.loop.state == LoopState.FAILED and state.loop.run.device_seconds_today == 12.5
    # Every stored payload decodes and encodes back to the stored data (plus defaults of fields
    # older entries lack).
    for entry in ledger.entries():
        kind, data = event_data(event_from(entry.kind, entry.data))
        assert kind == entry.kind
        assert {k: data[k] for k in entry.data} == entry.data


def test_an_old_plain_text_error_reads_as_a_typed_error() -> None:
    failures = [r.event for r in Ledger.open(_copy(RELEASE_LEDGER)).recorded()
                if isinstance(r.event, EvalFailed | TrainFailed)]
    infos = [error_info(f.error) for f in failures]
    assert [i.name for i in infos] == ["cancelled", "error", "error"]
    assert infos[1].message == "engine rtb is not ready"


def test_a_new_failure_is_recorded_with_its_stable_code_and_name() -> None:
    info = failure_of(GateFailed("gate failed", data={"failed": ["composite"]}))
    assert info == ErrorInfo(code=1005, name="gate_failed", message="gate failed",
                             data={"failed": ["composite"]})
    internal = failure_of(RuntimeError("secret detail"))
    assert internal.code == -32603 and "secret" not in internal.message


def test_an_event_with_an_unknown_field_is_refused() -> None:
    with pytest.raises(msgspec.ValidationError):
        event_from("loop.transition", {"from": "idle", "to": "paused", "sneaky": 1})
    assert isinstance(event_from("loop.transition", {"from": "idle", "to": "paused"}),
                      LoopTransition)


def _copy(path: Path) -> Path:
    import tempfile

    target = Path(tempfile.mkdtemp()) / "ledger.jsonl"
    shutil.copy(path, target)
    return target
