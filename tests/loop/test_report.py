"""Which evals are receipts: full evals only (type full, not quick, every governed scenario),
read from a real ledger."""

from __future__ import annotations

from pathlib import Path

from modelsmith.loop.eval.report import full_evals
from modelsmith.loop.records.events import EvalFinished, EvalStarted, ScenariosChanged
from modelsmith.loop.records.ledger import Ledger

SETS = {"core": "c" * 64, "held-out": "h" * 64, "synthetic": "s" * 64}


def _eval(ledger: Ledger, tag: str, *, type: str = "full", quick: bool = False,
          domain: str | None = None, scenarios: int = 10, engine: str | None = None) -> None:
    ledger.append(EvalStarted(tag=tag, job_id=f"j-{tag}", type=type, quick=quick,
                              scenarios=scenarios, scenario_sets=SETS, domain=domain, engine=engine))
    ledger.append(EvalFinished(tag=tag, job_id=f"j-{tag}", composite=0.5, held_out=0.5,
                               passed=False, summary_sha256="0" * 64, results_sha256="1" * 64,
                               engine=engine))


def test_only_full_evals_of_every_governed_scenario_are_receipts(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path / "ledger.jsonl")
    # 7 core + 3 held-out are governed; the 5 synthetic ones are not counted.
    ledger.append(ScenariosChanged(versions=SETS, counts={"core": 7, "held-out": 3, "synthetic": 5},
                                   changed=["core", "held-out", "synthetic"]))
    _eval(ledger, "full")
    _eval(ledger, "quick", quick=True, scenarios=4)
    _eval(ledger, "core-only", type="core", scenarios=7)
    _eval(ledger, "one-domain-all", domain="adtech", scenarios=10)  # selected every scenario
    _eval(ledger, "one-domain-some", domain="search", scenarios=6)  # a subset: not a receipt
    _eval(ledger, "engine", engine="frontier")
    ledger.append(EvalStarted(tag="unfinished", job_id="j-u", type="full", quick=False,
                              scenarios=10, scenario_sets=SETS))

    found = full_evals(ledger.recorded())

    assert [e.tag for e in found] == ["full", "one-domain-all", "engine"]
    assert found[2].engine == "frontier" and found[0].engine is None
    assert found[0].governed_versions() == {"core": "c" * 64, "held-out": "h" * 64}
