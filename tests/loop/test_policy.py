"""The promotion policy gate, judged on real eval, adapter and training-manifest files."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
from support.promotion_home import CORE_IDS, HELD_IDS, PromotionHome

from modelsmith.loop.promotion.policy import check_policy
from modelsmith.loop.records.events import PromotionApproved
from modelsmith.rpc.schema.promotion import PolicyReport

ALL_CHECKS = {"cluster_state", "candidate", "eval_found", "eval_full", "eval_of_candidate",
              "adapter_hash", "scenario_sets", "composite", "held_out", "regressions", "paired_regression",
              "training_manifest", "leakage", "judge_agreement"}


def failed(report: PolicyReport) -> set[str]:
    return {c.check for c in report.checks if not c.passed}


def test_a_trained_candidate_with_a_passing_full_eval_passes_every_check(tmp_path: Path) -> None:
    home = PromotionHome(tmp_path)
    adapter = home.trained_candidate()
    _, runtime = home.open()

    report = check_policy(runtime).report

    assert report.passed, [c for c in report.checks if not c.passed]
    assert {c.check for c in report.checks} == ALL_CHECKS
    assert report.adapter == adapter and report.eval_tag == "iter-1-full"


def test_a_failing_gate_names_every_broken_rule_not_only_the_first(tmp_path: Path) -> None:
    home = PromotionHome(tmp_path)
    home.add_eval("base-eval", None, set(CORE_IDS))
    adapter = home.add_adapter(1)
    # A quick eval of the candidate with a low composite and no held-out pass.
    home.add_eval("iter-1-quick", adapter, set(CORE_IDS[:2]), quick=True, iteration=1)
    _, runtime = home.open()

    report = check_policy(runtime).report

    assert not report.passed
    assert {"eval_full", "composite", "held_out", "regressions"} <= failed(report)
    assert "candidate" not in failed(report)
    assert all(c.detail for c in report.checks)


def test_an_eval_of_another_adapter_fails_the_candidate_check(tmp_path: Path) -> None:
    home = PromotionHome(tmp_path)
    home.add_eval("base-full", None, set(CORE_IDS + HELD_IDS))
    home.add_adapter(1)
    _, runtime = home.open()

    report = check_policy(runtime, "base-full").report

    assert {"eval_of_candidate", "adapter_hash"} <= failed(report)


def test_an_adapter_altered_after_its_eval_fails_the_hash_check(tmp_path: Path) -> None:
    home = PromotionHome(tmp_path)
    adapter = home.trained_candidate()
    weights = home.root / "adapters" / adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes() + b"!")
    _, runtime = home.open()

    assert failed(check_policy(runtime).report) == {"adapter_hash"}


def test_an_eval_of_older_scenario_set_versions_fails(tmp_path: Path) -> None:
    home = PromotionHome(tmp_path)
    home.trained_candidate()
    with (home.root / "scenarios" / "core" / "s.jsonl").open("a") as extra:
        extra.write(json.dumps({"id": "core-new", "domain": "pricing", "prompt": "new?",
                                "reference": "4", "rubric": {"criteria": [{"type": "exact"}]}})
                    + "\n")
    _, runtime = home.open()

    assert "scenario_sets" in failed(check_policy(runtime).report)


def test_an_eval_summary_edited_after_the_fact_does_not_count(tmp_path: Path) -> None:
    home = PromotionHome(tmp_path)
    home.trained_candidate()
    path = home.root / "evals" / "iter-1-full" / "summary.json"
    path.write_bytes(path.read_bytes().replace(b'"duration_s": 60.0', b'"duration_s": 61.0'))
    _, runtime = home.open()

    assert failed(check_policy(runtime).report) == {"eval_found"}


def test_a_manifest_that_trained_on_a_held_out_scenario_fails_the_leakage_check(
    tmp_path: Path,
) -> None:
    home = PromotionHome(tmp_path)
    home.add_eval("base-eval", None, set(CORE_IDS[2:]))
    held = home.catalog.require(HELD_IDS[0])
    from modelsmith.loop.scoring.scenarios import prompt_hash, scenario_hash

    lying_manifest = {  # a trainer that claims ok but trained on held-1
        "job_id": "train-1", "cluster": "rtb-pricing", "iteration": 1, "eval_tag": "base-eval",
        "scenarios": [{"id": held.id, "hash": scenario_hash(held),
                       "prompt_hash": prompt_hash(held)}],
        "leakage_check": {"ok": True, "checked": 1}, "metrics_log": "logs/train-train-1.log",
    }
    adapter = home.add_adapter(1, manifest=lying_manifest)
    home.add_eval("iter-1-full", adapter, set(CORE_IDS + HELD_IDS), iteration=1)
    _, runtime = home.open()

    report = check_policy(runtime).report

    assert failed(report) == {"leakage"}
    leakage = next(c for c in report.checks if c.check == "leakage")
    assert HELD_IDS[0] in leakage.detail


def test_a_missing_training_manifest_fails(tmp_path: Path) -> None:
    home = PromotionHome(tmp_path)
    adapter = home.trained_candidate()
    (home.root / "adapters" / adapter / "training_manifest.json").unlink()
    _, runtime = home.open()

    assert failed(check_policy(runtime).report) == {"training_manifest", "leakage"}


def test_regressions_are_counted_against_the_champions_eval(tmp_path: Path) -> None:
    home = PromotionHome(tmp_path)
    home.add_eval("base-eval", None, set())
    champion = home.add_adapter(1)
    home.add_eval("iter-1-full", champion, set(CORE_IDS + HELD_IDS), iteration=1)
    home.ledger.append(PromotionApproved(
        request_id="r1", adapter=champion, adapter_sha256="0" * 64, iteration=1,
        eval_tag="iter-1-full", principals=["alice"], nonces=["n1"],
        decision_file="promotions/r1.decision.json", sha256="0" * 64))
    candidate = home.add_adapter(2, source_eval="iter-1-full")
    # Better than the threshold, but core-6 passed under the champion and fails now.
    home.add_eval("iter-2-full", candidate, set(CORE_IDS[:5] + HELD_IDS), iteration=2)
    _, runtime = home.open()

    report = check_policy(runtime).report

    assert failed(report) == {"regressions"}
    detail = next(c.detail for c in report.checks if c.check == "regressions")
    assert "core-6" in detail and "iter-1-full" in detail


def test_the_report_crosses_the_wire_as_plain_json(tmp_path: Path) -> None:
    home = PromotionHome(tmp_path)
    home.trained_candidate()
    _, runtime = home.open()

    wire = msgspec.json.decode(msgspec.json.encode(check_policy(runtime).report))

    assert wire["passed"] is True
    assert {c["check"] for c in wire["checks"]} == ALL_CHECKS
