"""Training-set selection from an eval's results, and the leakage check that guards it."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import yaml

from modelsmith.errors import LeakageError, ValidationError
from modelsmith.examples import rtb_pricing
from modelsmith.loop.eval.run import score_batch
from modelsmith.loop.scoring.scenarios import (
    Scenario,
    ScenarioCatalog,
    load_catalog,
    prompt_hash,
    scenario_hash,
)
from modelsmith.loop.train.training_set import (
    ScenarioRef,
    TrainingManifest,
    build_manifest,
    leakage_check,
    select_training_scenarios,
)
from modelsmith.rpc.schema.evals import ScenarioResult

MANIFEST_FIELDS = {
    "job_id": "job-1", "cluster": rtb_pricing.CLUSTER, "iteration": 1, "eval_tag": "base",
    "base_model": "tiny", "init_adapter": None, "near_miss_margin": 0.0,
    "metrics_log": "logs/train-job-1.log", "created_at": "2026-01-01T00:00:00Z",
}


def write_example(home: Path, *, extra_core: list[dict[str, object]] | None = None) -> Path:
    root = rtb_pricing.write_cluster(home, home / "model", core=8, held_out=4)
    if extra_core:
        (root / "scenarios" / "core" / "extra.yaml").write_text(
            yaml.safe_dump({"scenarios": extra_core}, sort_keys=False), encoding="utf-8")
    return root / "scenarios"


def answer_all(catalog: ScenarioCatalog, answer: str) -> list[ScenarioResult]:
    return score_batch([(s, answer, "stop", 1) for s in catalog.all()])


def manifest(scenarios: list[Scenario], catalog: ScenarioCatalog) -> TrainingManifest:
    return build_manifest(scenarios=scenarios, catalog=catalog, **MANIFEST_FIELDS)


def test_only_core_failures_are_selected_never_held_out_ones(tmp_path: Path) -> None:
    catalog = load_catalog(write_example(tmp_path))
    results = answer_all(catalog, "none of these")  # every scenario fails

    picked = select_training_scenarios(catalog, results, near_miss_margin=0.0)

    assert [s.id for s in picked] == sorted(s.id for s in catalog.all() if s.set == "core")
    built = manifest(picked, catalog)
    assert built.leakage_check.ok and built.leakage_check.held_out_count == 4
    assert [r.id for r in built.scenarios] == [s.id for s in picked]
    assert built.scenarios[0].hash == scenario_hash(picked[0])


def test_passing_core_scenarios_are_left_out_unless_within_the_near_miss_margin(tmp_path: Path) -> None:
    catalog = load_catalog(write_example(tmp_path))
    right = score_batch([(s, str(s.reference), "stop", 1) for s in catalog.all()])

    with pytest.raises(ValidationError):
        select_training_scenarios(catalog, right, near_miss_margin=0.0)
    assert len(select_training_scenarios(catalog, right, near_miss_margin=1.0)) == 8


def test_the_leakage_check_refuses_a_held_out_id(tmp_path: Path) -> None:
    catalog = load_catalog(write_example(tmp_path))
    held = catalog.held_out.scenarios[0]

    proof = leakage_check([ScenarioRef(id=held.id, hash="x", prompt_hash="y")], catalog.held_out.scenarios)
    assert not proof.ok and proof.violations == [held.id]
    with pytest.raises(LeakageError) as caught:
        manifest([held], catalog)
    assert caught.value.code == 1010


def test_a_held_out_prompt_copied_into_core_under_a_new_id_is_refused(tmp_path: Path) -> None:
    held = rtb_pricing.scenarios("held-out", 4, 0, core_count=8)[0]
    copy = {**held, "id": "core-copied", "tags": ["copied"]}
    catalog = load_catalog(write_example(tmp_path, extra_core=[copy]))
    copied = catalog.get("core-copied")
    assert copied is not None and copied.set == "core"
    assert prompt_hash(copied) == prompt_hash(catalog.get(str(held["id"])))  # type: ignore[arg-type]

    picked = select_training_scenarios(catalog, answer_all(catalog, "wrong"), near_miss_margin=0.0)
    assert "core-copied" in [s.id for s in picked]
    with pytest.raises(LeakageError) as caught:
        manifest(picked, catalog)
    assert caught.value.code == 1010
    assert caught.value.data["violations"] == ["core-copied"]


def test_an_eval_with_repeated_trials_picks_each_failing_scenario_once(tmp_path: Path) -> None:
    catalog = load_catalog(write_example(tmp_path))
    once = answer_all(catalog, "none of these")  # every scenario fails, in each of 3 trials
    trials = [msgspec.structs.replace(r, trial=t) for t in range(3) for r in once]

    picked = select_training_scenarios(catalog, trials, near_miss_margin=0.0)

    assert [s.id for s in picked] == sorted(s.id for s in catalog.all() if s.set == "core")
