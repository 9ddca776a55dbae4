"""Crash safety of the synthetic set: the ledger decides what a crash left half done.

A synth job's file waits under a pending dot-name until its ``synth.finished`` is recorded; an
acceptance is recorded before anything moves. ``governance.recover`` (run at each daemon start)
publishes what the ledger names, removes what it never heard of, and finishes recorded
acceptances, whichever step the crash interrupted. Real files, the real loader.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from modelsmith.examples import rtb_pricing
from modelsmith.loop.scoring.scenarios import load_catalog
from modelsmith.loop.synth.generate import (
    candidates_from_generator,
    load_generator,
    pattern_sources,
)
from modelsmith.loop.synth.governance import (
    accept_into_core,
    accepted_file,
    publish,
    recover,
    write_kept,
)
from modelsmith.loop.synth.verify import verify
from modelsmith.rpc.schema.train import FailurePattern

SPEC = "modelsmith.examples.rtb_pricing:synthesise"
DIGEST = "cd" * 32


@pytest.fixture
def scenarios(tmp_path: Path) -> Path:
    root = rtb_pricing.write_cluster(tmp_path, tmp_path / "model")
    return root / "scenarios"


def _written(scenarios: Path, job: str) -> tuple[str, str, list[str]]:
    catalog = load_catalog(scenarios)
    pattern = FailurePattern(pattern="choice/wrong_value", criterion="choice", kind="wrong_value",
                             count=1, lost_score=1.0, tags={}, scenario_ids=["core-000"], examples=[])
    candidates = candidates_from_generator(load_generator(SPEC), SPEC, pattern,
                                           pattern_sources(pattern, catalog), 3)
    kept = verify(candidates, catalog, threshold=90.0).kept
    file, sha = write_kept(scenarios, job, kept, {"generator": SPEC})
    return file, sha, [s.id for s, _ in kept]


def test_a_written_synth_file_is_in_no_set_until_published(scenarios: Path) -> None:
    file, _, ids = _written(scenarios, "j1")
    assert not (scenarios / file).exists()  # crash here: the loader sees nothing of it
    assert load_catalog(scenarios).sets.get("synthetic") is None or not load_catalog(scenarios).sets["synthetic"].scenarios
    publish(scenarios, file)
    assert sorted(load_catalog(scenarios).sets["synthetic"].ids()) == sorted(ids)


def test_recovery_publishes_what_the_ledger_recorded_and_removes_the_rest(scenarios: Path) -> None:
    recorded, sha, ids = _written(scenarios, "j1")  # its synth.finished was recorded
    unrecorded, _, _ = _written(scenarios, "j2")  # the crash came before its synth.finished
    done = recover(scenarios, {recorded: sha}, [], None)
    assert len(done) == 2
    assert (scenarios / recorded).exists() and not (scenarios / unrecorded).exists()
    leftovers = [p.name for p in (scenarios / "synthetic").iterdir()]
    assert not any(name.startswith(".") for name in leftovers)
    assert "synth-j2.provenance.json" not in leftovers
    assert sorted(load_catalog(scenarios).sets["synthetic"].ids()) == sorted(ids)
    assert recover(scenarios, {recorded: sha}, [], None) == []  # nothing left to do


def test_a_pending_file_whose_bytes_differ_from_the_record_is_not_published(scenarios: Path) -> None:
    file, _, _ = _written(scenarios, "j1")
    recover(scenarios, {file: "0" * 64}, [], None)
    assert not (scenarios / file).exists()


def test_a_recorded_acceptance_is_finished_whichever_step_the_crash_interrupted(scenarios: Path) -> None:
    file, sha, ids = _written(scenarios, "j1")
    publish(scenarios, file)
    first, second = ids[0], ids[1]
    # Crash right after scenarios.accepted was recorded: nothing moved yet.
    core_file, core_sha = accepted_file(scenarios, [first], DIGEST, None)
    done = recover(scenarios, {file: sha}, [([first], core_file, DIGEST)], None)
    assert done and (scenarios / core_file).exists()
    catalog = load_catalog(scenarios)
    assert catalog.require(first).set == "core" and first not in catalog.sets["synthetic"].ids()

    # Crash after the core file was written under its pending name and the synthetic file
    # rewritten, before the rename: finished by the rename alone, no id in two sets.
    other = "ef" * 32
    core_2, _ = accepted_file(scenarios, [second], other, None)
    accept_into_core(scenarios, [second], other, None)
    (scenarios / core_2).rename(scenarios / "core" / f".{Path(core_2).name}.pending")
    recover(scenarios, {file: sha}, [([first], core_file, DIGEST), ([second], core_2, other)], None)
    catalog = load_catalog(scenarios)  # loads: an id in two sets would be refused here
    assert catalog.require(second).set == "core"
    assert (scenarios / core_file).read_bytes() and core_sha


def test_a_pending_core_file_of_no_recorded_acceptance_is_removed(scenarios: Path) -> None:
    file, sha, ids = _written(scenarios, "j1")
    publish(scenarios, file)
    stray = scenarios / "core" / ".accepted-0123456789ab.jsonl.pending"
    stray.write_text("{}\n")
    assert recover(scenarios, {file: sha}, [], None) == [
        "removed .accepted-0123456789ab.jsonl.pending: no acceptance is waiting for it"]
    assert not stray.exists()
    assert sorted(load_catalog(scenarios).sets["synthetic"].ids()) == sorted(ids)
