"""The GRPO trainer child process: ``python -m modelsmith.gpu.trainer SPEC.json``.

``python -m modelsmith.gpu.trainer --warm`` imports torch, transformers, TRL and PEFT first and
then waits for one job on stdin (see :func:`_wait_for_job`); EOF on stdin makes it exit 0.

It trains a LoRA adapter with TRL's ``GRPOTrainer`` on the spec's scenarios, rewarding each
completion with the scenario's own rubric (what is graded is what is trained), and reports on
stdout one JSON event per line (see :mod:`modelsmith.gpu.trainer_spec`). Everything else that
libraries print goes to stderr: the real stdout is kept on a private descriptor for events and
file descriptor 1 is pointed at stderr before torch or transformers are imported.

Stopping:

- ``completed``  max_steps reached.
- ``plateau``    the reward's moving average stopped rising (:class:`PlateauDetector`).
- ``non_finite`` a loss, reward, gradient norm, weight or the model's output went NaN/inf; no
                 checkpoint and no adapter are written from a broken model.
- ``cancelled``  SIGTERM: the current step finishes, a checkpoint and the adapter are saved.

Exit codes: 0 for every ``stopped`` reason, 1 on a failure (a ``failed`` event, the traceback on
stderr), 2 for a spec that cannot run (a ``failed`` event with error ``bad_spec``).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

import msgspec

from modelsmith.errors import LeakageError, ModelsmithError, ValidationError
from modelsmith.gpu.trainer_control import (
    EventWriter,
    PlateauDetector,
    StopState,
    finite_or_none,
    is_non_finite,
    take_over_stdout,
)
from modelsmith.gpu.trainer_reward import (
    JudgeClients,
    RewardScorer,
    check_judges,
    make_reward_function,
)
from modelsmith.gpu.trainer_rollouts import RolloutBackend
from modelsmith.gpu.trainer_spec import (
    AdapterSaved,
    StopReason,
    TrainerCheckpoint,
    TrainerFailed,
    TrainerMetric,
    TrainerReleased,
    TrainerStarted,
    TrainerStopped,
    TrainJobSpec,
    decode_spec,
)

__all__ = ["EXIT_BAD_SPEC", "EXIT_FAILED", "EXIT_OK", "PlateauDetector", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_SPEC = 2

CHECKPOINTS_DIR = "checkpoints"
WARM_FLAG = "--warm"
HELD_OUT_SET = "held-out"


# ---------------------------------------------------------------------------------------------
# Spec checks that need the file system (shape checks are in trainer_spec.decode_spec).


def load_and_check_spec(path: Path) -> TrainJobSpec:
    """Read the spec and refuse what cannot run; raises ModelsmithError (exit code 2)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValidationError(f"cannot read spec: {exc}", data={"file": str(path)}) from exc
    spec = decode_spec(raw, file=str(path))
    base = Path(spec.base_model)
    if not (base / "config.json").is_file():
        raise ValidationError(
            f"base_model is not a local model directory: {base}",
            data={"file": str(base), "field": "base_model"},
        )
    if spec.init_adapter is not None:
        from modelsmith.gpu.adapters import verify_adapter

        verify_adapter(Path(spec.init_adapter))
    if Path(spec.output_dir).exists() and not spec.resume:
        raise ValidationError(
            f"output_dir exists and resume is false: {spec.output_dir}",
            data={"file": spec.output_dir, "field": "output_dir"},
        )
    return spec


def decode_scenarios(spec: TrainJobSpec) -> list[Any]:
    """The spec's scenario dicts as loop Scenarios; held-out scenarios are refused."""
    from modelsmith.loop.scoring.scenarios import Scenario

    scenarios = []
    for index, raw in enumerate(spec.scenarios):
        try:
            scenario = msgspec.convert(raw, Scenario)
        except msgspec.ValidationError as exc:
            raise ValidationError(
                f"bad scenario in spec: {exc}", data={"field": f"scenarios[{index}]"}
            ) from exc
        if scenario.set == HELD_OUT_SET:
            raise LeakageError(
                f"held-out scenario {scenario.id} in a training job",
                data={"field": f"scenarios[{index}]", "scenario": scenario.id},
            )
        scenarios.append(scenario)
    return scenarios


# ---------------------------------------------------------------------------------------------
# The training run.


def _pick_device(spec: TrainJobSpec) -> str:
    import torch

    if spec.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise ValidationError("device is cuda but no CUDA device is visible", data={"field": "device"})
    return spec.device


def _rollout_backend(spec: TrainJobSpec, device: str) -> RolloutBackend:
    if spec.rollout.backend != "auto":
        return spec.rollout.backend
    import importlib.util

    return "vllm" if device == "cuda" and importlib.util.find_spec("vllm") else "hf"


def _render_prompts(spec: TrainJobSpec, tokenizer: Any, scenarios: list[Any]) -> list[str]:
    """Each prompt as eval renders it, cut from the left to ``max_prompt_length`` tokens."""
    from modelsmith.gpu.prompting import render_prompt
    from modelsmith.loop.scoring.scenarios import prompt_messages

    limit = spec.grpo.max_prompt_length
    rendered = []
    for scenario in scenarios:
        # The same messages eval sends to the engine, through the same template.
        text = render_prompt(tokenizer, prompt_messages(scenario),
                             chat_template_kwargs=spec.chat_template_kwargs)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > limit:
            # Keep the end: the question and the generation prompt matter more than a preamble.
            text = tokenizer.decode(ids[-limit:], skip_special_tokens=False)
        rendered.append(text)
    return rendered


def _build_dataset(spec: TrainJobSpec, prompts: list[str], scenarios: list[Any]) -> Any:
    from datasets import Dataset

    ids = [scenario.id for scenario in scenarios]
    # TRL drops incomplete generation batches: repeat rows until one step's worth of groups fits.
    groups_per_step = max(
        1,
        spec.grpo.per_device_train_batch_size
        * spec.grpo.gradient_accumulation_steps
        // spec.grpo.num_generations,
    )
    copies = max(1, math.ceil(groups_per_step / len(ids)))
    return Dataset.from_dict({"prompt": prompts * copies, "scenario_id": ids * copies})


def _checkpoint_step(checkpoint: Path) -> int:
    try:
        state = msgspec.json.decode((checkpoint / "trainer_state.json").read_bytes())
        return int(state["global_step"])
    except (OSError, msgspec.DecodeError, KeyError, TypeError, ValueError):
        return int(checkpoint.name.rsplit("-", 1)[-1])


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest complete ``checkpoint-N`` directory, or None."""
    if not checkpoints_dir.is_dir():
        return None
    candidates = []
    for path in checkpoints_dir.iterdir():
        prefix, _, number = path.name.rpartition("-")
        # HF writes trainer_state.json last: without it the checkpoint is incomplete.
        if prefix == "checkpoint" and number.isdigit() and (path / "trainer_state.json").is_file():
            candidates.append((int(number), path))
    return max(candidates)[1] if candidates else None


def _make_callbacks(spec: TrainJobSpec, events: EventWriter, stop: StopState, model: Any,
                    rollouts: Any, scorer: RewardScorer) -> list[Any]:
    import torch
    from transformers import TrainerCallback

    plateau = PlateauDetector.from_spec(spec.convergence)
    checkpoints_dir = Path(spec.work_dir) / CHECKPOINTS_DIR

    def parameters_non_finite() -> bool:
        with torch.no_grad():
            return any(
                not bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad
            )

    class ModelsmithCallback(TrainerCallback):  # type: ignore[misc]
        """Maps TRL logs to events and turns stop causes into ``control`` decisions."""

        def __init__(self) -> None:
            self.last_log_time: float | None = None
            self.last_log_step = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            self.last_log_time = time.monotonic()
            self.last_log_step = state.global_step

        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            # Data-parallel ranks decide together, or one rank would wait for the others in
            # the next step's collectives forever: a flag raised on any rank holds on all.
            reward_bad, cancel = agreed(args.device, stop.non_finite_reward is not None,
                                        stop.cancel_requested)
            if reward_bad:
                stop.stop("non_finite", stop.non_finite_reward or "non-finite reward on another rank")
            elif parameters_non_finite():
                stop.stop("non_finite", f"non-finite adapter weights after step {state.global_step}")
            if stop.reason == "non_finite":
                control.should_save = False
                control.should_training_stop = True
            elif cancel:
                stop.stop("cancelled", "SIGTERM" if stop.cancel_requested else "SIGTERM on another rank")
                control.should_save = True
                control.should_training_stop = True

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any
        ) -> None:
            logs = logs or {}
            if "loss" not in logs and "reward" not in logs:
                return  # the end-of-training summary, not a step
            now = time.monotonic()
            steps = state.global_step - self.last_log_step
            seconds = (now - self.last_log_time) / steps if self.last_log_time and steps else None
            self.last_log_time, self.last_log_step = now, state.global_step
            drawn = rollouts.stats.take()
            rate = (
                drawn.completion_tokens / drawn.generate_seconds if drawn.generate_seconds else None
            )
            events.emit(
                TrainerMetric(
                    step=state.global_step,
                    reward_mean=finite_or_none(logs.get("reward")),
                    reward_std=finite_or_none(logs.get("reward_std")),
                    kl=finite_or_none(logs.get("kl")),
                    loss=finite_or_none(logs.get("loss")),
                    learning_rate=finite_or_none(logs.get("learning_rate")),
                    completion_length=finite_or_none(logs.get("completions/mean_length")),
                    seconds_per_step=seconds,
                    epoch=finite_or_none(logs.get("epoch")),
                    zero_variance_group_share=finite_or_none(logs.get("frac_reward_zero_std")),
                    zero_variance_first_draw_share=drawn.uniform_first_draw_share,
                    extra_rollouts=drawn.extra_rollouts,
                    rollout_tokens_per_second=rate,
                    judge_failure_share=scorer.take_judge_failure_share(),
                )
            )
            bad = [k for k in ("loss", "reward", "grad_norm", "kl") if is_non_finite(logs.get(k))]
            if bad:
                stop.stop("non_finite", f"non-finite {', '.join(bad)} at step {state.global_step}")
            elif isinstance(logs.get("reward"), int | float) and plateau.observe(
                state.global_step, float(logs["reward"])
            ):
                stop.stop(
                    "plateau",
                    f"reward average {plateau.best:.4f} did not rise by more than "
                    f"{plateau.min_delta} for {plateau.patience} windows of {plateau.window}",
                )
            if stop.reason in ("non_finite", "plateau"):
                control.should_save = stop.reason != "non_finite" and control.should_save
                control.should_training_stop = True

        def on_save(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            path = checkpoints_dir / f"checkpoint-{state.global_step}"
            events.emit(TrainerCheckpoint(step=state.global_step, path=str(path)))

    return [ModelsmithCallback()]


def agreed(device: Any, *flags: bool) -> tuple[bool, ...]:
    """Each flag raised on any data-parallel rank (one all-reduce); the flags as they are when
    this process trains alone."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flags
    tensor = torch.tensor([float(flag) for flag in flags], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tuple(bool(value) for value in tensor.tolist())


def _model_output_non_finite(model: Any, tokenizer: Any, prompt: str) -> bool:
    """Does a forward pass on one prompt give NaN/inf logits? (weights can be finite but huge)."""
    import torch

    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(**{k: v.to(device) for k, v in inputs.items()}).logits
    return not bool(torch.isfinite(logits).all())


def run(spec: TrainJobSpec, events: EventWriter, stop: StopState) -> int:
    """Train, report, save, release; returns the exit code. Raises on failure (exit code 1)."""
    import torch

    held: dict[str, Any] = {}
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        return _train(spec, events, stop, held)
    finally:
        rollouts = held.pop("rollouts", None)
        if rollouts is not None:
            rollouts.close()
        judges = held.pop("judges", None)
        if judges is not None:
            judges.close()
        held.clear()  # the trainer, model and optimiser: their last references
        import gc

        gc.collect()
        peak = final = None
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            peak = int(torch.cuda.max_memory_allocated())
            final = int(torch.cuda.memory_allocated())
        events.emit(TrainerReleased(peak_device_bytes=peak, final_device_bytes=final))


def _train(spec: TrainJobSpec, events: EventWriter, stop: StopState, held: dict[str, Any]) -> int:
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM
    from trl.trainer.grpo_config import GRPOConfig
    from trl.trainer.grpo_trainer import GRPOTrainer

    from modelsmith.gpu.adapters import manifest_sha256, save_adapter_atomically
    from modelsmith.gpu.prompting import load_tokenizer
    from modelsmith.gpu.trainer_canaries import CANARIES_FILE, encode_canaries, record_canaries
    from modelsmith.gpu.trainer_rollouts import RolloutSampler

    scenarios = decode_scenarios(spec)
    device = _pick_device(spec)
    bf16 = spec.bf16 if spec.bf16 is not None else device == "cuda"
    dtype = torch.bfloat16 if bf16 else torch.float32
    tokenizer = load_tokenizer(Path(spec.base_model))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = _render_prompts(spec, tokenizer, scenarios)
    dataset = _build_dataset(spec, prompts, scenarios)

    torch.manual_seed(spec.grpo.seed)  # LoRA init is random
    model: Any = AutoModelForCausalLM.from_pretrained(
        spec.base_model, dtype=dtype, local_files_only=True
    )
    peft_config = None
    if spec.init_adapter is not None:
        model = PeftModel.from_pretrained(model, spec.init_adapter, is_trainable=True)
    else:
        peft_config = LoraConfig(
            r=spec.lora.r,
            lora_alpha=spec.lora.alpha,
            lora_dropout=spec.lora.dropout,
            target_modules=list(spec.lora.target_modules),
            task_type="CAUSAL_LM",
        )

    checkpoints_dir = Path(spec.work_dir) / CHECKPOINTS_DIR
    g = spec.grpo
    config = GRPOConfig(
        output_dir=str(checkpoints_dir),
        max_steps=g.max_steps,
        learning_rate=g.learning_rate,
        num_generations=g.num_generations,
        per_device_train_batch_size=g.per_device_train_batch_size,
        gradient_accumulation_steps=g.gradient_accumulation_steps,
        max_completion_length=g.max_completion_length,
        beta=g.beta,
        temperature=g.temperature,
        seed=g.seed,
        save_strategy="steps",
        save_steps=g.save_steps,
        save_total_limit=2,
        logging_strategy="steps",
        logging_steps=g.logging_steps,
        report_to="none",
        disable_tqdm=True,
        use_cpu=device == "cpu",
        bf16=bf16,
    )
    judges = JudgeClients(spec.judges)
    held["judges"] = judges
    judges.start()  # EngineError when a judge does not answer: no training on a dead judge
    scorer = RewardScorer(prompts, scenarios, judges)
    rollouts = RolloutSampler(
        backend=_rollout_backend(spec, device),
        score=scorer.score_one,
        score_many=scorer.score_many,
        tokenizer=tokenizer,
        group_size=g.num_generations,
        max_completion_length=g.max_completion_length,
        temperature=g.temperature,
        max_resample_rounds=spec.rollout.max_resample_rounds,
        sync_steps=spec.rollout.sync_steps,
        work_dir=Path(spec.work_dir),
        base_model=spec.base_model,
        device=device,
        dtype="bfloat16" if bf16 else "float32",
        lora_rank=spec.lora.r,
        # Prompts are cut to max_prompt_length; the model's own limit bounds the engine's.
        max_model_len=min(
            g.max_prompt_length + g.max_completion_length,
            int(getattr(model.config, "max_position_embeddings", 1 << 30)),
        ),
        gpu_memory_utilization=spec.rollout.gpu_memory_utilization,
        seed=g.seed,
    )
    held["rollouts"] = rollouts
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=make_reward_function(scorer, stop),
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        rollout_func=rollouts,
    )
    held["trainer"] = trainer
    del model
    trained: Any = trainer.model
    for callback in _make_callbacks(spec, events, stop, trained, rollouts, scorer):
        trainer.add_callback(callback)
    rollouts.start()  # the engine's start is set-up, not a step

    resume_from = latest_checkpoint(checkpoints_dir) if spec.resume else None
    events.emit(
        TrainerStarted(
            total_steps=g.max_steps,
            resumed_from_step=_checkpoint_step(resume_from) if resume_from else 0,
            device=device,
            dtype="bfloat16" if bf16 else "float32",
            trainable_params=sum(p.numel() for p in trained.parameters() if p.requires_grad),
            world_size=trainer.accelerator.num_processes,
            rank=trainer.accelerator.process_index,
        )
    )
    probe_prompt = dataset[0]["prompt"]
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except RuntimeError:
        # Sampling from NaN/inf logits fails inside generate; that is divergence, not a bug.
        if stop.reason is None and _model_output_non_finite(trained, tokenizer, probe_prompt):
            traceback.print_exc()
            stop.stop("non_finite", "the model's output became non-finite during generation")
        else:
            raise
    step = int(trainer.state.global_step)
    if stop.reason is None and _model_output_non_finite(trained, tokenizer, probe_prompt):
        stop.stop("non_finite", f"the model's output is non-finite after step {step}")
    reason: StopReason = stop.reason or "completed"
    detail = stop.detail or f"reached max_steps={g.max_steps}"
    events.emit(TrainerStopped(reason=reason, step=step, detail=detail))
    if reason == "non_finite" or not trainer.accelerator.is_main_process:
        return EXIT_OK  # with several ranks, rank 0 alone records canaries and saves

    rollouts.close()  # the engine's memory is not needed for the canaries or the save
    canary_prompts = [(s.id, p) for s, p in zip(scenarios, prompts, strict=True)][: spec.canaries]
    canaries = record_canaries(trained, tokenizer, canary_prompts, g.max_completion_length)
    output_dir = Path(spec.output_dir)
    manifest = save_adapter_atomically(
        trained,
        output_dir,
        base_model=spec.base_model,
        replace=spec.resume,
        extra_files={CANARIES_FILE: encode_canaries(canaries)} if canaries else None,
    )
    events.emit(
        AdapterSaved(
            path=str(output_dir),
            sha256=manifest.adapter_sha256,
            manifest_sha256=manifest_sha256(output_dir),
            files=[entry.name for entry in manifest.files],
        )
    )
    return EXIT_OK


def _import_training_stack() -> None:
    """What every job imports: done by a warm child before its spec arrives."""
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: F401

    import modelsmith.gpu.trainer_canaries
    import modelsmith.gpu.trainer_rollouts
    import modelsmith.loop.scoring.rubric  # noqa: F401


def _wait_for_job() -> list[str] | None:
    """Warm mode: one JSON line on stdin, ``{"spec": PATH, "env": {...}}``; None at EOF.

    The environment (``CUDA_VISIBLE_DEVICES`` for the leased GPU) is applied here, before CUDA is
    initialised, so one warm child serves whichever device the next job is given.
    """
    line = sys.stdin.readline()
    if not line.strip():
        return None
    request = msgspec.json.decode(line.encode(), type=dict[str, Any])
    os.environ.update({str(k): str(v) for k, v in dict(request.get("env") or {}).items()})
    return [str(request["spec"])]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the child; returns the process exit code."""
    args = sys.argv[1:] if argv is None else argv
    events = take_over_stdout()
    stop = StopState()

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        # Only a flag: the step in flight finishes, then a callback stops and saves.
        stop.cancel_requested = True

    signal.signal(signal.SIGTERM, on_sigterm)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is "experimental"
    if args == [WARM_FLAG]:
        _import_training_stack()
        job = _wait_for_job()
        if job is None:
            return EXIT_OK  # the daemon went away (or no longer wants a warm trainer)
        args = job
    if len(args) != 1:
        print("usage: python -m modelsmith.gpu.trainer SPEC.json", file=sys.stderr)
        events.emit(TrainerFailed(error="bad_spec", detail="expected exactly one SPEC.json"))
        return EXIT_BAD_SPEC
    try:
        try:
            spec = load_and_check_spec(Path(args[0]))
            # Scenario decoding is cheap (no torch): a bad scenario is a bad spec, not a failure.
            check_judges(decode_scenarios(spec), spec.judges)
        except ModelsmithError as exc:
            print(f"bad spec: {exc} {exc.data}", file=sys.stderr)
            events.emit(TrainerFailed(error="bad_spec", detail=f"{exc.name}: {exc}"))
            return EXIT_BAD_SPEC
        return run(spec, events, stop)
    except Exception as exc:
        traceback.print_exc()
        error = exc.name if isinstance(exc, ModelsmithError) else type(exc).__name__
        events.emit(TrainerFailed(error=error, detail=str(exc)))
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
