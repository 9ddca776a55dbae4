"""The durable-write helper: whole files or nothing, records never overwritten."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from modelsmith.atomic import atomic_write_bytes, atomic_write_text, create_exclusive


def test_an_atomic_write_replaces_the_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "state.json"
    atomic_write_text(target, "one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.json"]


def test_an_exclusive_record_is_never_overwritten(tmp_path: Path) -> None:
    record = tmp_path / "promotions" / "2026-04-18-abc.json"
    create_exclusive(record, b'{"v": 1}')
    with pytest.raises(FileExistsError):
        create_exclusive(record, b'{"v": 2}')
    assert record.read_bytes() == b'{"v": 1}'
    assert [p.name for p in record.parent.iterdir()] == [record.name]


def test_racing_exclusive_writers_leave_exactly_one_whole_record(tmp_path: Path) -> None:
    record = tmp_path / "decision.json"
    outcomes: list[str] = []

    def writer(n: int) -> None:
        try:
            create_exclusive(record, f"writer {n} ".encode() * 1000)
            outcomes.append("won")
        except FileExistsError:
            outcomes.append("lost")

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert outcomes.count("won") == 1 and outcomes.count("lost") == 7
    text = record.read_text()
    assert len(set(text.split(" ")[1::2])) == 1  # one writer's bytes only
    assert [p.name for p in tmp_path.iterdir()] == ["decision.json"]
