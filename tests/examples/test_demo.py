"""The quickstart's steps at reduced size: one iteration of a few GRPO steps, against a real daemon.

This proves the demo's wiring (model build, daemon start, CLI eval/diagnose/train/compare, the
follow-up eval, the policy check, a bounded stop), not the quickstart's targets: a handful of
steps is not meant to pass the gate.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelsmith.examples import rtb_pricing
from modelsmith.examples.demo import (
    DEMO_HELD_OUT,
    DEMO_UNSEEN_HELD_OUT,
    DemoSettings,
    prepare_model,
    run_demo,
    targets,
)
from modelsmith.examples.tinymodel import MARKER_NAME

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(420)]


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One demo model cache for the module: the build is the slow part."""
    return tmp_path_factory.mktemp("demo-cache")


def test_one_short_demo_iteration_runs_every_daemon_driven_step(
    tmp_path: Path, model_cache: Path
) -> None:
    report = run_demo(DemoSettings(
        work_root=tmp_path, cache_dir=model_cache, home=tmp_path / "home",
        max_iterations=1, max_steps=3, quiet=True,
    ))

    assert report.baseline_exit_code == 1  # the base model is below the gate
    assert report.baseline_composite is not None
    assert report.composite_threshold is not None
    assert report.baseline_composite < report.composite_threshold
    assert len(report.iterations) == 1
    iteration = report.iterations[0]
    assert iteration.train_exit_code == 0
    assert iteration.train_state == "succeeded"
    assert iteration.adapter == "iter-1"
    assert iteration.eval_tag is not None
    assert (report.home / "rtb-pricing" / "evals" / iteration.eval_tag / "summary.json").is_file()
    assert iteration.composite is not None and 0.0 <= iteration.composite <= 1.0
    assert iteration.held_out_regressions is not None
    assert report.policy_exit_code in (0, 1)  # judged either way; never an error
    assert report.daemon_exit_code == 0
    assert {name for name, _, _ in targets(report)}  # the target table renders
    # Held-out on the types core uses and on the types it does not, each with its interval.
    assert report.baseline_figures is not None and iteration.figures is not None
    for figures in (report.baseline_figures, iteration.figures):
        seen, unseen = figures.by_kind["seen-type"], figures.by_kind["unseen-type"]
        assert (seen.count, unseen.count) == (DEMO_HELD_OUT, DEMO_UNSEEN_HELD_OUT)
        for figure in (figures.composite, figures.held_out, seen, unseen):
            assert figure.value is not None and figure.ci95 is not None
            assert figure.ci95[0] <= figure.value <= figure.ci95[1]
    assert iteration.paired_vs_baseline
    # One synth step with the rtb-pricing generator; the synthetic set scored before and after.
    assert report.synth_counts is not None and report.synth_counts["kept"] > 0
    assert report.synth_counts["refused_near_held_out"] == 0
    assert report.synthetic_baseline is not None and report.synthetic_final is not None
    assert any(name.startswith("stop the daemon") for name, _ in report.steps)


def test_the_demo_model_is_built_once_and_then_found_in_the_cache(model_cache: Path) -> None:
    first = prepare_model(model_cache)
    weights = (first / "model.safetensors").stat().st_mtime_ns
    second = prepare_model(model_cache)

    assert second == first
    assert (second / "model.safetensors").stat().st_mtime_ns == weights
    marker = json.loads((second / MARKER_NAME).read_text())
    # Pretrained on the domain prose once, then warm-started on the format once.
    assert len(marker["pretrains"]) == 1
    assert len(marker["warm_starts"]) == 1


def test_unseen_type_held_out_asks_about_types_the_model_read_about_but_core_never_uses(
    tmp_path: Path,
) -> None:
    root = rtb_pricing.write_cluster(tmp_path, tmp_path / "model", core=36, held_out=18,
                                     unseen_held_out=18)
    core = (root / "scenarios" / "core" / "bids.yaml").read_text()
    held = (root / "scenarios" / "held-out" / "bids.yaml").read_text()
    prose = " ".join(rtb_pricing.domain_corpus())

    for inventory in rtb_pricing.UNSEEN_INVENTORY:
        assert inventory not in core
        assert inventory in held
        assert f"{inventory} sells at a {rtb_pricing.UNSEEN_INVENTORY[inventory]} price" in prose
    # "seen-type" is also inside each "unseen-type" tag.
    assert held.count("unseen-type") == 18 and held.count("seen-type") == 18 + 18
