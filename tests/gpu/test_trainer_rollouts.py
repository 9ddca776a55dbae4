"""Rollouts on vLLM, uniform-group resampling, and the warm trainer child: real TRL on the CPU."""

from __future__ import annotations

import shutil
from pathlib import Path

import anyio
import pytest

from modelsmith.examples.tinymodel import warm_start
from modelsmith.gpu.trainer_process import run_trainer
from modelsmith.gpu.trainer_rollouts import RolloutStats, uniform_groups
from modelsmith.gpu.trainer_spec import (
    AdapterSaved,
    ConvergenceSpec,
    GrpoSpec,
    RolloutSpec,
    TrainerEvent,
    TrainerMetric,
    TrainJobSpec,
)
from modelsmith.gpu.warm_trainer import WarmTrainer

RUN_TIMEOUT = 300


@pytest.fixture(scope="module")
def yes_no_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir = tmp_path_factory.mktemp("yes-no-rollouts") / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    warm_start(model_dir, [(f"Is campaign {i} live?", a) for i in range(4) for a in ("yes", "no")])
    return model_dir


def spec_for(model: Path, root: Path, job: str, rollout: RolloutSpec) -> TrainJobSpec:
    return TrainJobSpec(
        job_id=job,
        cluster="adtech",
        base_model=str(model),
        output_dir=str(root / job / "adapter"),
        work_dir=str(root / job / "work"),
        scenarios=[
            {"id": f"live-{i}", "set": "core", "domain": "adtech", "prompt": f"Is campaign {i} live?",
             "rubric": {"criteria": [{"type": "contains", "value": "yes"}]}}
            for i in range(4)
        ],
        grpo=GrpoSpec(max_steps=4, learning_rate=1e-2, num_generations=4,
                      per_device_train_batch_size=8, max_completion_length=8, beta=0.0, save_steps=100),
        convergence=ConvergenceSpec(min_steps=10_000),
        rollout=rollout,
    )


def test_uniform_groups_are_those_whose_completions_share_one_reward() -> None:
    assert uniform_groups([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0], 2) == [0, 2, 3]


def test_rollout_stats_are_taken_once_per_step() -> None:
    stats = RolloutStats(groups=4, uniform_first_draw=1, extra_rollouts=8)
    taken = stats.take()
    assert (taken.uniform_first_draw_share, taken.extra_rollouts) == (0.25, 8)
    assert stats == RolloutStats()


def test_grpo_rollouts_on_vllm_train_an_adapter_with_bounded_resampling(
    yes_no_model: Path, tmp_path: Path
) -> None:
    spec = spec_for(yes_no_model, tmp_path, "vllm", RolloutSpec(backend="vllm", max_resample_rounds=1))
    events: list[TrainerEvent] = []

    async def go() -> None:
        with anyio.fail_after(RUN_TIMEOUT):
            await run_trainer(spec, on_event=events.append, log_path=tmp_path / "train.log",
                              env={"VLLM_CPU_KVCACHE_SPACE": "1", **__import__("os").environ})

    anyio.run(go)
    metrics = [e for e in events if isinstance(e, TrainerMetric)]
    assert len(metrics) == 4 and any(isinstance(e, AdapterSaved) for e in events)
    for metric in metrics:
        assert metric.zero_variance_first_draw_share is not None
        assert metric.rollout_tokens_per_second is not None
        # The documented bound: one resample round costs at most the step's 8 completions again.
        assert 0 <= metric.extra_rollouts <= 8
    assert not (Path(spec.work_dir) / "rollout-adapter").exists()


def test_the_next_job_runs_in_the_warm_child_started_after_the_last(
    yes_no_model: Path, tmp_path: Path
) -> None:
    warm = WarmTrainer()
    outcomes = []

    async def go() -> None:
        with anyio.fail_after(2 * RUN_TIMEOUT):
            try:
                for job in ("cold", "warm"):
                    spec = spec_for(yes_no_model, tmp_path, job, RolloutSpec(backend="hf"))
                    outcomes.append(await run_trainer(spec, on_event=lambda e: None,
                                                      log_path=tmp_path / f"{job}.log", warm=warm))
                assert warm.ready  # and one more waits for the job after
            finally:
                await warm.aclose()

    anyio.run(go)
    assert [o.stopped.reason for o in outcomes if o.stopped] == ["completed", "completed"]
    assert all(o.adapter is not None for o in outcomes)
    assert not warm.ready
