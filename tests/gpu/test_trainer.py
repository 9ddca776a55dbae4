"""The GRPO trainer child: real TRL + PEFT steps on the tiny model, on the CPU.

The base model is the session's tiny Llama, warm-started to answer "yes" or "no" (half each) to
"Is campaign N live?"; the rubric rewards "yes". GRPO has something real to move there, and a
few dozen steps show it.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import msgspec
import pytest
from safetensors.torch import load_file

from modelsmith.errors import TrainerError, ValidationError
from modelsmith.examples.tinymodel import warm_start
from modelsmith.gpu.adapters import verify_adapter
from modelsmith.gpu.trainer_canaries import (
    CANARIES_FILE,
    CANARY_LOGPROB_TOLERANCE,
    decode_canaries,
)
from modelsmith.gpu.trainer_control import PlateauDetector
from modelsmith.gpu.trainer_process import TrainerOutcome, run_trainer
from modelsmith.gpu.trainer_spec import (
    AdapterSaved,
    ConvergenceSpec,
    GrpoSpec,
    TrainerCheckpoint,
    TrainerEvent,
    TrainerMetric,
    TrainerReleased,
    TrainerStarted,
    TrainerStopped,
    TrainJobSpec,
    decode_event,
    decode_spec,
    encode_event,
    encode_spec,
    estimate_duration_minutes,
)

RUN_TIMEOUT = 240
T = TypeVar("T")


def yes_scenarios(count: int = 4, *, set_name: str = "core") -> list[dict[str, object]]:
    return [
        {
            "id": f"live-{i}",
            "set": set_name,
            "domain": "adtech",
            "prompt": f"Is campaign {i} live?",
            "rubric": {"criteria": [{"type": "contains", "value": "yes"}]},
        }
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def yes_no_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir = tmp_path_factory.mktemp("yes-no") / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    pairs = [(f"Is campaign {i} live?", answer) for i in range(4) for answer in ("yes", "no")]
    warm_start(model_dir, pairs)
    return model_dir


def make_spec(base_model: Path, root: Path, **changes: Any) -> TrainJobSpec:
    grpo = GrpoSpec(
        max_steps=changes.pop("max_steps", 10),
        learning_rate=changes.pop("learning_rate", 1e-2),
        num_generations=4,
        per_device_train_batch_size=8,
        max_completion_length=8,
        beta=0.0,
        save_steps=changes.pop("save_steps", 5),
    )
    fields: dict[str, Any] = {
        "job_id": "job-1",
        "cluster": "adtech",
        "base_model": str(base_model),
        "output_dir": str(root / "adapters" / "iter-1"),
        "work_dir": str(root / "work"),
        "scenarios": yes_scenarios(),
        "grpo": grpo,
        "convergence": ConvergenceSpec(min_steps=10_000),  # no plateau stop unless asked
    }
    fields.update(changes)
    return TrainJobSpec(**fields)


async def train(spec: TrainJobSpec, log_path: Path) -> tuple[TrainerOutcome, list[TrainerEvent]]:
    events: list[TrainerEvent] = []
    with anyio.fail_after(RUN_TIMEOUT):
        outcome = await run_trainer(spec, on_event=events.append, log_path=log_path)
    return outcome, events


def of_type(events: list[TrainerEvent], kind: type[T]) -> list[T]:
    return [event for event in events if isinstance(event, kind)]


def lora_b_weights(adapter_dir: Path) -> dict[str, Any]:
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return {name: tensor for name, tensor in weights.items() if "lora_B" in name}


@pytest.fixture(scope="module")
def first_run(
    yes_no_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainJobSpec, TrainerOutcome, list[TrainerEvent]]:
    root = tmp_path_factory.mktemp("first-run")
    spec = make_spec(yes_no_model, root, max_steps=40, save_steps=20)

    async def go() -> tuple[TrainerOutcome, list[TrainerEvent]]:
        return await train(spec, root / "train.log")

    outcome, events = anyio.run(go)
    return spec, outcome, events


# ---------------------------------------------------------------------------------------------
# A real run


def test_grpo_on_the_rubric_raises_the_reward(
    first_run: tuple[TrainJobSpec, TrainerOutcome, list[TrainerEvent]],
) -> None:
    _, outcome, events = first_run
    metrics = of_type(events, TrainerMetric)
    rewards = [m.reward_mean for m in metrics if m.reward_mean is not None]
    assert [m.step for m in metrics] == list(range(1, 41))
    k = 8
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    assert last > first, (first, last)
    assert outcome.stopped == TrainerStopped(
        reason="completed", step=40, detail="reached max_steps=40"
    )


def test_a_run_reports_started_checkpoints_and_the_adapter_it_saved(
    first_run: tuple[TrainJobSpec, TrainerOutcome, list[TrainerEvent]],
) -> None:
    spec, outcome, events = first_run
    started = events[0]
    assert isinstance(started, TrainerStarted)
    assert (started.total_steps, started.resumed_from_step) == (40, 0)
    assert (started.device, started.dtype) == ("cpu", "float32")
    assert started.trainable_params > 0
    assert [c.step for c in of_type(events, TrainerCheckpoint)] == [20, 40]
    saved = of_type(events, AdapterSaved)
    assert len(saved) == 1 and saved[0].path == spec.output_dir
    assert outcome.adapter is not None
    assert outcome.adapter.adapter_sha256 == saved[0].sha256
    assert verify_adapter(Path(spec.output_dir)) == outcome.adapter
    assert isinstance(events[-2], AdapterSaved)
    assert events[-1] == TrainerReleased(peak_device_bytes=None, final_device_bytes=None)  # CPU
    metric = of_type(events, TrainerMetric)[-1]
    assert metric.zero_variance_group_share is not None
    assert 0.0 <= metric.zero_variance_group_share <= 1.0
    assert metric.learning_rate is not None and metric.completion_length is not None
    assert metric.seconds_per_step is not None and metric.seconds_per_step > 0


def test_the_adapter_carries_canaries_that_the_trained_model_reproduces(
    first_run: tuple[TrainJobSpec, TrainerOutcome, list[TrainerEvent]],
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec, outcome, _ = first_run
    adapter = Path(spec.output_dir)
    assert outcome.adapter is not None
    assert CANARIES_FILE in [f.name for f in outcome.adapter.files]  # the manifest covers it
    record = decode_canaries((adapter / CANARIES_FILE).read_bytes())
    assert (record.format, record.tolerance) == (1, CANARY_LOGPROB_TOLERANCE)
    assert [c.scenario_id for c in record.canaries] == ["live-0", "live-1", "live-2"]
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model)
    base = AutoModelForCausalLM.from_pretrained(spec.base_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter))
    for canary in record.canaries:
        assert canary.completion_token_ids and len(canary.token_logprobs) == len(
            canary.completion_token_ids
        )
        # Replay: teacher-forced logprobs of the recorded tokens, and greedy choice at each step.
        prompt_ids = tokenizer(canary.prompt_text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + canary.completion_token_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].float()
        steps = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
        assert steps.argmax(dim=-1).tolist() == canary.completion_token_ids
        replayed = [float(steps[i, t]) for i, t in enumerate(canary.completion_token_ids)]
        assert all(
            abs(a - b) <= record.tolerance
            for a, b in zip(replayed, canary.token_logprobs, strict=True)
        )


def test_the_trained_adapter_weights_moved_away_from_their_initial_zeros(
    first_run: tuple[TrainJobSpec, TrainerOutcome, list[TrainerEvent]],
) -> None:
    spec, _, _ = first_run
    b_weights = lora_b_weights(Path(spec.output_dir))
    assert b_weights  # PEFT initialises every lora_B to zero
    assert any(float(t.abs().max()) > 0 for t in b_weights.values())


def test_every_event_line_lands_in_the_log(
    first_run: tuple[TrainJobSpec, TrainerOutcome, list[TrainerEvent]],
) -> None:
    spec, _, events = first_run
    log_path = Path(spec.work_dir).parent / "train.log"
    logged = [decode_event(line) for line in log_path.read_bytes().splitlines()]
    assert logged == events


async def test_training_continues_from_an_initial_adapter(
    first_run: tuple[TrainJobSpec, TrainerOutcome, list[TrainerEvent]],
    yes_no_model: Path,
    tmp_path: Path,
) -> None:
    champion_spec, _, champion_events = first_run
    spec = make_spec(yes_no_model, tmp_path, max_steps=3, init_adapter=champion_spec.output_dir)
    outcome, events = await train(spec, tmp_path / "train.log")
    assert of_type(events, TrainerStarted)[0].trainable_params > 0
    champion_start = [m.reward_mean or 0.0 for m in of_type(champion_events, TrainerMetric)][:8]
    continued = [m.reward_mean or 0.0 for m in of_type(events, TrainerMetric)]
    # It starts where the champion left off (saying "yes"), not where the base model starts.
    assert sum(continued) / len(continued) > sum(champion_start) / len(champion_start)
    assert outcome.adapter is not None


# ---------------------------------------------------------------------------------------------
# Stopping and resuming


async def test_resume_continues_the_step_count_from_the_last_checkpoint(
    yes_no_model: Path, tmp_path: Path
) -> None:
    first_spec = make_spec(yes_no_model, tmp_path, max_steps=6, save_steps=3)
    first, _ = await train(first_spec, tmp_path / "a.log")
    assert first.stopped is not None and first.stopped.step == 6

    resumed_spec = make_spec(yes_no_model, tmp_path, max_steps=9, save_steps=3, resume=True)
    outcome, events = await train(resumed_spec, tmp_path / "b.log")
    started = of_type(events, TrainerStarted)[0]
    metrics = of_type(events, TrainerMetric)
    assert started.resumed_from_step == 6
    assert metrics[0].step > 6
    assert [m.step for m in metrics] == [7, 8, 9]
    assert outcome.stopped is not None and outcome.stopped.step == 9
    assert outcome.adapter is not None  # replaced the first run's adapter


async def test_an_absurd_learning_rate_stops_as_non_finite_without_an_adapter(
    yes_no_model: Path, tmp_path: Path
) -> None:
    spec = make_spec(yes_no_model, tmp_path, max_steps=10, save_steps=1, learning_rate=1e30)
    outcome, events = await train(spec, tmp_path / "train.log")
    assert outcome.stopped is not None and outcome.stopped.reason == "non_finite"
    assert outcome.stopped.step < 10
    assert outcome.adapter is None and not of_type(events, AdapterSaved)
    assert not await anyio.Path(spec.output_dir).exists()


async def test_a_flat_reward_stops_training_on_a_plateau(
    yes_no_model: Path, tmp_path: Path
) -> None:
    scenarios = yes_scenarios()
    for scenario in scenarios:  # never emitted: the reward stays 0
        scenario["rubric"] = {"criteria": [{"type": "contains", "value": "zebra-quartz"}]}
    spec = make_spec(
        yes_no_model,
        tmp_path,
        max_steps=40,
        scenarios=scenarios,
        convergence=ConvergenceSpec(
            plateau_window=2, plateau_min_delta=0.01, plateau_patience=2, min_steps=4
        ),
    )
    outcome, _ = await train(spec, tmp_path / "train.log")
    assert outcome.stopped is not None and outcome.stopped.reason == "plateau"
    assert outcome.stopped.step == 6  # best at window 1 (step 2), stale at steps 4 and 6
    assert outcome.adapter is not None


# ---------------------------------------------------------------------------------------------
# Specs the child refuses (exit code 2)


async def test_a_held_out_scenario_in_a_training_job_is_refused(
    yes_no_model: Path, tmp_path: Path
) -> None:
    spec = make_spec(yes_no_model, tmp_path, scenarios=yes_scenarios(set_name="held-out"))
    with pytest.raises(TrainerError) as caught:
        await train(spec, tmp_path / "train.log")
    assert caught.value.data["exit_code"] == 2
    assert caught.value.data["error"] == "bad_spec"


async def test_an_existing_output_dir_without_resume_is_refused(
    yes_no_model: Path, tmp_path: Path
) -> None:
    spec = make_spec(yes_no_model, tmp_path)
    await anyio.Path(spec.output_dir).mkdir(parents=True)
    with pytest.raises(TrainerError) as caught:
        await train(spec, tmp_path / "train.log")
    assert caught.value.data["exit_code"] == 2


# ---------------------------------------------------------------------------------------------
# The spec and event contract (no process)


def test_a_spec_survives_the_json_round_trip(tmp_path: Path) -> None:
    spec = make_spec(tmp_path / "model", tmp_path)
    assert decode_spec(encode_spec(spec)) == spec


def test_a_group_size_that_does_not_divide_the_batch_is_a_bad_spec(tmp_path: Path) -> None:
    spec = make_spec(tmp_path / "model", tmp_path)
    raw = msgspec.json.decode(encode_spec(spec))
    raw["grpo"]["num_generations"] = 3
    with pytest.raises(ValidationError) as caught:
        decode_spec(msgspec.json.encode(raw))
    assert caught.value.data["field"] == "grpo.num_generations"


def test_unknown_spec_fields_are_refused(tmp_path: Path) -> None:
    raw = msgspec.json.decode(encode_spec(make_spec(tmp_path / "model", tmp_path)))
    raw["grpo"]["max_stesp"] = 5
    with pytest.raises(ValidationError):
        decode_spec(msgspec.json.encode(raw))


def test_non_finite_metric_values_travel_as_null() -> None:
    metric = TrainerMetric(
        step=3,
        reward_mean=math.nan,
        reward_std=None,
        kl=None,
        loss=math.inf,
        learning_rate=1e-5,
        completion_length=4.0,
        seconds_per_step=0.1,
        epoch=1.0,
    )
    decoded = decode_event(encode_event(metric))
    assert isinstance(decoded, TrainerMetric)
    assert decoded.reward_mean is None and decoded.loss is None and decoded.step == 3


def test_a_line_that_is_not_an_event_is_a_validation_error() -> None:
    with pytest.raises(ValidationError):
        decode_event(b'{"event": "exploded"}')


def test_the_duration_estimate_grows_with_the_steps(tmp_path: Path) -> None:
    estimate: Callable[[int], int] = lambda steps: estimate_duration_minutes(  # noqa: E731
        make_spec(tmp_path, tmp_path, max_steps=steps)
    )
    assert 1 <= estimate(10) <= estimate(1000) < estimate(100_000)


# ---------------------------------------------------------------------------------------------
# Plateau detection (pure)


def test_a_rising_reward_is_never_a_plateau() -> None:
    detector = PlateauDetector(window=3, min_delta=0.01, patience=2, min_steps=0)
    assert not any(detector.observe(step, step * 0.1) for step in range(1, 40))


def test_a_flat_reward_is_a_plateau_after_patience_windows_and_min_steps() -> None:
    detector = PlateauDetector(window=3, min_delta=0.01, patience=2, min_steps=12)
    stops = [step for step in range(1, 30) if detector.observe(step, 0.5)]
    # windows end at 3 (best), 6 and 9 (stale x2, but before min_steps), 12: plateau.
    assert stops[0] == 12


def test_an_improvement_smaller_than_min_delta_counts_as_stale() -> None:
    detector = PlateauDetector(window=1, min_delta=0.1, patience=3, min_steps=0)
    results = [detector.observe(step, 0.5 + step * 0.01) for step in range(1, 6)]
    assert results == [False, False, False, True, True]
