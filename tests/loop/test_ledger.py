"""The ledger: hash chain, durability, crash recovery and corruption detection."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import msgspec
import pytest
from structlog.testing import capture_logs

from modelsmith.errors import LedgerCorrupt, NotFound, ValidationError
from modelsmith.loop.records.events import (
    EvalFinished,
    EvalStarted,
    PromotionRequested,
    ScenariosChanged,
    TrainStarted,
)
from modelsmith.loop.records.ledger import GENESIS_PREV, Ledger, verify_file


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def started(tag: str = "base", job_id: str = "j-1", scenarios: int = 12) -> EvalStarted:
    return EvalStarted(tag=tag, job_id=job_id, type="full", quick=False, scenarios=scenarios,
                       scenario_sets={"core": "v1"})


def finished(tag: str = "base", composite: float = 0.625) -> EvalFinished:
    return EvalFinished(tag=tag, job_id="j-1", composite=composite, held_out=None, passed=False,
                        summary_sha256="a" * 64, results_sha256="b" * 64)


def training(job_id: str = "t-1") -> TrainStarted:
    return TrainStarted(job_id=job_id, iteration=1, eval_tag="base", scenarios=2, work_dir="w")


def _write_three(path: Path) -> bytes:
    ledger = Ledger.open(path)
    ledger.append(started())
    ledger.append(finished())
    ledger.append(training())
    return path.read_bytes()


def test_appended_entries_are_chained_and_read_back_identically_after_reopen(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c" / "ledger.jsonl"
    ledger = Ledger.open(path)
    first = ledger.append(started())
    second = ledger.append(finished(composite=0.5))

    assert first.seq == 0 and second.seq == 1
    entries = ledger.entries()
    assert entries[0].prev == GENESIS_PREV
    lines = path.read_bytes().splitlines()
    assert entries[1].prev == _sha256_hex(lines[0])
    assert first.ts.endswith("Z")

    reopened = Ledger.open(path)
    assert reopened.entries() == entries
    assert reopened.recorded() == [first, second]
    assert reopened.recovery is None
    assert verify_file(path).ok


def test_the_on_disk_format_is_sorted_canonical_json_hashed_without_the_hash_field(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger.open(path)
    ledger.append(ScenariosChanged(versions={"core": "abc"}, counts={"core": 1}, changed=["core"]))
    entry = ledger.entries()[0]
    line = path.read_bytes().rstrip(b"\n")

    decoded = msgspec.json.decode(line)
    assert list(decoded) == sorted(decoded)
    body = {key: value for key, value in decoded.items() if key != "hash"}
    assert decoded["hash"] == _sha256_hex(msgspec.json.encode(body, order="sorted"))
    assert decoded["hash"] == entry.hash
    assert decoded["kind"] == "scenarios.changed"
    assert decoded["data"] == {"versions": {"core": "abc"}, "counts": {"core": 1}, "changed": ["core"]}


def test_the_in_memory_index_finds_entries_by_kind_and_keeps_the_newest(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path / "ledger.jsonl")
    assert ledger.last is None and ledger.last_of(EvalStarted) is None and len(ledger) == 0
    ledger.append(started(scenarios=1))
    ledger.append(finished())
    newest = ledger.append(started(scenarios=2))

    assert [r.event.scenarios for r in ledger.find(EvalStarted)] == [1, 2]
    assert ledger.last_of(EvalStarted) == newest
    assert ledger.last is not None and ledger.last.seq == newest.seq
    assert len(ledger) == 3
    assert [entry.seq for entry in ledger.entries(since=1)] == [1, 2]
    assert ledger.find(PromotionRequested) == []


def test_an_event_that_would_not_read_back_the_same_is_refused_and_nothing_is_written(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger.open(path)
    with pytest.raises(ValidationError):  # NaN is written as null: it would read back as None
        ledger.append(finished(composite=float("nan")))
    assert path.read_bytes() == b""
    assert len(ledger) == 0


def test_an_entry_of_no_known_kind_is_corruption_named_by_its_line(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    body = {"seq": 0, "ts": "2026-11-26T12:00:00.000000Z", "kind": "eval.progress",
            "data": {"n": 1}, "prev": GENESIS_PREV}
    body["hash"] = _sha256_hex(msgspec.json.encode(body, order="sorted"))
    path.write_bytes(msgspec.json.encode(body, order="sorted") + b"\n")

    with pytest.raises(LedgerCorrupt) as caught:
        Ledger.open(path)
    assert caught.value.data["reason"] == "bad_event"
    assert caught.value.data["line"] == 1
    assert not verify_file(path).ok


def test_a_ledger_cut_at_every_byte_of_its_last_entry_reopens_without_that_entry(
    tmp_path: Path,
) -> None:
    original = _write_three(tmp_path / "full.jsonl")
    last_start = original.rstrip(b"\n").rfind(b"\n") + 1
    intact = Ledger.open(tmp_path / "full.jsonl").entries()[:2]

    for cut in range(last_start, len(original)):
        path = tmp_path / f"cut-{cut}.jsonl"
        path.write_bytes(original[:cut])
        with capture_logs() as logs:
            ledger = Ledger.open(path)

        assert ledger.entries() == intact, cut
        assert path.read_bytes() == original[:last_start], cut
        if cut == last_start:
            assert ledger.recovery is None
        else:
            assert ledger.recovery is not None
            assert ledger.recovery.seq == 2
            assert ledger.recovery.offset == last_start
            assert ledger.recovery.dropped_bytes == cut - last_start
            assert [log["event"] for log in logs] == ["ledger.torn_tail_removed"]
        # The chain continues cleanly from the intact prefix.
        assert ledger.append(training("retry")).seq == 2
        assert verify_file(path).ok


def test_a_tail_of_zero_bytes_left_by_a_crash_is_cut_off(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    original = _write_three(path)
    path.write_bytes(original + b"\0" * 4096)

    ledger = Ledger.open(path)

    assert len(ledger) == 3
    assert ledger.recovery is not None and ledger.recovery.dropped_bytes == 4096
    assert path.read_bytes() == original


def test_verify_file_reports_a_torn_tail_without_repairing_it(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    original = _write_three(path)
    path.write_bytes(original[:-7])

    report = verify_file(path)

    assert report.ok
    assert report.entries == 2 and report.last_seq == 1
    assert report.torn_tail is not None and report.torn_tail.reason == "no_newline"
    assert path.read_bytes() == original[:-7]


def test_a_flipped_byte_anywhere_in_a_middle_entry_raises_ledger_corrupt_naming_it(
    tmp_path: Path,
) -> None:
    original = _write_three(tmp_path / "full.jsonl")
    lines = original.split(b"\n")
    middle_start = len(lines[0]) + 1
    middle_end = middle_start + len(lines[1]) + 1  # its newline included

    for offset in range(middle_start, middle_end):
        damaged = bytearray(original)
        damaged[offset] ^= 0x01
        path = tmp_path / f"flip-{offset}.jsonl"
        path.write_bytes(bytes(damaged))

        with pytest.raises(LedgerCorrupt) as caught:
            Ledger.open(path)
        assert caught.value.data["seq"] == 1, offset
        assert caught.value.data["line"] == 2
        assert caught.value.data["file"] == str(path)
        assert path.read_bytes() == bytes(damaged)  # nothing repaired or cut

        report = verify_file(path)
        assert not report.ok
        assert report.problem is not None and report.problem["seq"] == 1


def test_a_complete_last_line_pointing_at_the_wrong_predecessor_is_corruption_not_a_tear(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.jsonl"
    original = _write_three(path)
    lines = original.rstrip(b"\n").split(b"\n")
    forged = msgspec.json.decode(lines[2])
    forged["prev"] = GENESIS_PREV
    body = {key: value for key, value in forged.items() if key != "hash"}
    forged["hash"] = _sha256_hex(msgspec.json.encode(body, order="sorted"))
    lines[2] = msgspec.json.encode(forged, order="sorted")
    path.write_bytes(b"\n".join(lines) + b"\n")

    with pytest.raises(LedgerCorrupt) as caught:
        Ledger.open(path)
    assert caught.value.data["reason"] == "bad_prev"
    assert caught.value.data["seq"] == 2


def test_concurrent_appends_from_threads_keep_the_chain_valid(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger.open(path)
    threads_count, per_thread = 4, 20

    def worker(worker_id: int) -> None:
        for index in range(per_thread):
            ledger.append(started(tag=f"w{worker_id}", job_id=str(index)))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive()

    total = threads_count * per_thread
    assert [entry.seq for entry in ledger.entries()] == list(range(total))
    report = verify_file(path)
    assert report.ok and report.entries == total
    assert Ledger.open(path).entries() == ledger.entries()


def test_ten_thousand_entries_written_from_the_documented_format_open_as_typed_events(
    tmp_path: Path,
) -> None:
    # Written here from the documented format, which also pins that format down.
    path = tmp_path / "ledger.jsonl"
    lines: list[bytes] = []
    prev = GENESIS_PREV
    for seq in range(10_000):
        body = {
            "seq": seq,
            "ts": "2026-11-26T12:00:00.000000Z",
            "kind": "eval.finished",
            "data": {k: v for k, v in msgspec.to_builtins(finished(tag=f"t{seq}", composite=0.5)).items() if k != "kind"},
            "prev": prev,
        }
        body["hash"] = _sha256_hex(msgspec.json.encode(body, order="sorted"))
        line = msgspec.json.encode(body, order="sorted")
        lines.append(line)
        prev = _sha256_hex(line)
    path.write_bytes(b"\n".join(lines) + b"\n")

    ledger = Ledger.open(path)

    assert len(ledger) == 10_000
    assert ledger.recorded()[-1].event == finished(tag="t9999", composite=0.5)


def test_verifying_a_missing_ledger_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        verify_file(tmp_path / "absent.jsonl")
