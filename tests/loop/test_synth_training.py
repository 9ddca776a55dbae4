"""--target failures+synthetic: the synthetic scenarios of an eval's failure patterns join its
core failures, and the manifest's leakage proof checks them for near-duplicate held-out prompts
as well as exact hashes (a synthetic file edited after it was verified is caught here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelsmith.errors import LeakageError
from modelsmith.examples import rtb_pricing
from modelsmith.loop.eval.diagnose import diagnose
from modelsmith.loop.eval.run import score_batch
from modelsmith.loop.scoring.scenarios import load_catalog, prompt_text
from modelsmith.loop.synth.generate import (
    candidates_from_generator,
    load_generator,
    pattern_sources,
)
from modelsmith.loop.synth.governance import publish, read_provenance, write_kept
from modelsmith.loop.synth.verify import verify
from modelsmith.loop.train.training_set import (
    build_manifest,
    select_synthetic,
    select_training_scenarios,
)

SPEC = "modelsmith.examples.rtb_pricing:synthesise"
FIELDS = {"job_id": "job-1", "cluster": rtb_pricing.CLUSTER, "iteration": 1, "eval_tag": "e1",
          "base_model": "tiny", "init_adapter": None, "near_miss_margin": 0.0,
          "metrics_log": "logs/train-job-1.log", "created_at": "2026-01-01T00:00:00Z"}


def _synthesised(tmp_path: Path) -> tuple[Path, list[str]]:
    """An rtb cluster whose eval answered "mid" everywhere, and synthetic scenarios for its
    first failure pattern; returns the scenarios folder and that eval's pattern ids."""
    root = rtb_pricing.write_cluster(tmp_path, tmp_path / "model", core=9, held_out=9)
    catalog = load_catalog(root / "scenarios")
    results = score_batch([(s, "mid", "stop", 1) for s in catalog.all()])
    patterns = diagnose("rtb-pricing", "e1", results).patterns
    pattern = patterns[0]
    kept = verify(candidates_from_generator(load_generator(SPEC), SPEC, pattern,
                                            pattern_sources(pattern, catalog), 6),
                  catalog, threshold=90.0).kept
    assert len(kept) == 6
    publish(root / "scenarios", write_kept(root / "scenarios", "j1", kept, {"generator": SPEC})[0])
    return root / "scenarios", [p.pattern for p in patterns]


def test_the_synthetic_scenarios_of_the_patterns_train_and_the_proof_checks_them(
    tmp_path: Path,
) -> None:
    scenarios_dir, patterns = _synthesised(tmp_path)
    catalog = load_catalog(scenarios_dir)
    provenance = read_provenance(scenarios_dir)
    synthetic = select_synthetic(catalog, provenance, set(patterns))
    assert len(synthetic) == 6 and all(s.set == "synthetic" for s in synthetic)
    assert select_synthetic(catalog, provenance, {"json/wrong_format"}) == []

    results = score_batch([(s, "mid", "stop", 1) for s in catalog.all() if s.set != "synthetic"])
    failures = select_training_scenarios(catalog, results, near_miss_margin=0.0)
    manifest = build_manifest(scenarios=[*failures, *synthetic], catalog=catalog,
                              near_duplicate_threshold=90.0, **FIELDS)
    proof = manifest.leakage_check
    assert proof.ok and proof.checked == len(failures) + 6
    assert proof.near_duplicates_checked == 6 and proof.near_duplicate_threshold == 90.0
    assert {r.id for r in manifest.scenarios} >= {s.id for s in synthetic}


def test_a_synthetic_file_edited_into_a_held_out_paraphrase_is_leakage(tmp_path: Path) -> None:
    scenarios_dir, patterns = _synthesised(tmp_path)
    catalog = load_catalog(scenarios_dir)
    held = prompt_text(catalog.held_out.scenarios[0])
    (path,) = (scenarios_dir / "synthetic").glob("*.jsonl")
    lines = path.read_text().splitlines()
    edited = json.loads(lines[0])
    edited["prompt"] = held.upper().replace(",", ":")  # a paraphrase: same after normalising
    path.write_text("\n".join([json.dumps(edited), *lines[1:]]) + "\n")

    catalog = load_catalog(scenarios_dir)
    synthetic = select_synthetic(catalog, read_provenance(scenarios_dir), set(patterns))
    with pytest.raises(LeakageError) as caught:
        build_manifest(scenarios=synthetic, catalog=catalog, near_duplicate_threshold=90.0,
                       **FIELDS)
    assert caught.value.data["violations"] == [edited["id"]]
    # Without the near-duplicate check (exact hashes only) the paraphrase would pass.
    build_manifest(scenarios=synthetic, catalog=catalog, **FIELDS)
