"""The GRPO trainer's job spec and the event lines it prints: the contract between daemon and child.

The daemon writes a :class:`TrainJobSpec` as JSON and starts ``python -m modelsmith.gpu.trainer
SPEC.json``; the child prints one JSON object per line on stdout, each a :data:`TrainerEvent`
tagged by its ``"event"`` field::

    started ─► metric* ─► checkpoint* ─► stopped ─► adapter_saved? ─► released
                                    └─► failed   (exit code 1)

Memory: ``released``, the last event, carries the peak and the final allocated device memory;
the child releases the model, optimiser and rollout engine before it measures the final one.

Canaries (the hot-load check): when the job saves an adapter, ``canaries.json`` is in the
adapter directory and covered by its ``manifest.json`` file hashes::

    {"format": 1, "tolerance": 0.05,
     "canaries": [{"scenario_id": str, "prompt_text": str, "completion_text": str,
                   "completion_token_ids": [int], "token_logprobs": [float]}]}

``prompt_text`` is the exact text given to the model (chat template applied, generation prompt
included; tokenised with ``add_special_tokens=False``). ``completion_token_ids`` is the greedy
(temperature 0) continuation of at most ``max_completion_length`` tokens from the trained model
(base + adapter, in the training dtype), ending at the first EOS token if one came (the EOS id is
included); ``completion_text`` is its decoding without special tokens; ``token_logprobs[i]`` is
the natural-log probability of ``completion_token_ids[i]`` under the model's raw logits
(log-softmax, no temperature, no penalties). A replaying engine must produce the same token ids
greedily, and each logprob within ``tolerance`` (absolute, per token) of the recorded one: 0.05
covers float32 vs bf16 kernels and batch-order differences between transformers and vLLM on one
model, while a stale or wrong adapter moves the greedy tokens themselves or the logprobs by far
more. The canaries are the first ``TrainJobSpec.canaries`` training scenarios (in spec order).

Non-finite floats (NaN, inf) cannot be JSON; msgspec writes them as ``null``, so every metric
float is ``float | None``.

Standard library and msgspec only: the daemon imports this without torch.
"""

from __future__ import annotations

import math
from typing import Literal

import msgspec

from modelsmith.errors import ValidationError

__all__ = [
    "AdapterSaved",
    "ConvergenceSpec",
    "GrpoSpec",
    "JudgeEndpoint",
    "LoraSpec",
    "RolloutSpec",
    "StopReason",
    "TrainJobSpec",
    "TrainerCheckpoint",
    "TrainerEvent",
    "TrainerFailed",
    "TrainerMetric",
    "TrainerReleased",
    "TrainerStarted",
    "TrainerStopped",
    "decode_event",
    "decode_spec",
    "encode_event",
    "encode_spec",
    "estimate_duration_minutes",
]

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


class LoraSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The LoRA adapter's shape. Ignored when the job continues from ``init_adapter``."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES


class GrpoSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """GRPO hyper-parameters, passed on to TRL's ``GRPOConfig``.

    ``per_device_train_batch_size * gradient_accumulation_steps`` completions are generated per
    optimiser step and must be a multiple of ``num_generations`` (the group size).
    ``max_prompt_length`` is enforced by the child (prompts are cut from the left) because TRL
    no longer truncates prompts itself.
    """

    max_steps: int = 50
    learning_rate: float = 1e-5
    num_generations: int = 4
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_prompt_length: int = 512
    max_completion_length: int = 128
    beta: float = 0.04
    temperature: float = 1.0
    seed: int = 0
    save_steps: int = 25
    logging_steps: int = 1


class RolloutSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How GRPO completions are sampled (see :mod:`modelsmith.gpu.trainer_rollouts`).

    ``"auto"`` is ``"vllm"`` on CUDA when vllm is installed, else ``"hf"``. ``"vllm"`` generates with an offline vLLM engine inside the trainer process,
    loading the in-training LoRA adapter every ``sync_steps`` optimiser steps (sleeping between
    rollouts on CUDA, with ``gpu_memory_utilization`` of the device while awake); ``"hf"`` uses
    transformers' ``generate`` through TRL. A group whose completions all get the same reward
    is regenerated up to ``max_resample_rounds`` times (0: never), so one generation batch of
    N completions costs at most ``N * (1 + max_resample_rounds)`` completions.
    """

    backend: Literal["auto", "vllm", "hf"] = "auto"
    sync_steps: int = 1
    max_resample_rounds: int = 2
    gpu_memory_utilization: float = 0.3


class ConvergenceSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """When to stop before ``max_steps``.

    The moving average of the reward over ``plateau_window`` logged steps is checked once per
    window; when it has not risen by more than ``plateau_min_delta`` above its best for
    ``plateau_patience`` windows in a row, and at least ``min_steps`` steps have run, training
    stops with reason ``"plateau"``.
    """

    plateau_window: int = 10
    plateau_min_delta: float = 0.01
    plateau_patience: int = 3
    min_steps: int = 20


class JudgeEndpoint(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An ``llm_judge`` engine the child asks for rewards: an OpenAI-compatible HTTP server.

    Keyed in :attr:`TrainJobSpec.judges` by the criterion's ``engine`` name. ``api_key_env`` is
    the *name* of the environment variable the child reads the key from at each request: the
    key itself never goes into the spec file. ``temperature``/``max_tokens`` are how the eval
    asks the judge, so the reward reads the judge as the eval does. The child sends one step's
    judge requests together (at most ``max_concurrency`` in flight); each attempt is bounded by
    ``timeout_s`` and the whole batch by ``batch_timeout_s``; a request unanswered by then is a
    judge failure for that completion (see :mod:`modelsmith.gpu.trainer_reward`).
    """

    url: str
    model: str
    api_key_env: str | None = None
    timeout_s: float = 60.0
    batch_timeout_s: float = 300.0
    max_concurrency: int = 16
    max_retries: int = 2
    retry_max_delay_s: float = 10.0
    temperature: float = 0.0
    max_tokens: int = 256


class TrainJobSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One GRPO job. Paths are local; ``scenarios`` are scenario objects as plain dicts.

    ``output_dir`` is the final adapter directory (``<cluster>/adapters/iter-N``) and must not
    exist yet; ``work_dir`` holds the spec, checkpoints (``work_dir/checkpoints``), and the pid.
    ``bf16=None`` means bf16 exactly when the job runs on CUDA.
    """

    job_id: str
    cluster: str
    base_model: str
    output_dir: str
    work_dir: str
    scenarios: list[dict[str, object]]
    init_adapter: str | None = None
    lora: LoraSpec = LoraSpec()
    grpo: GrpoSpec = GrpoSpec()
    convergence: ConvergenceSpec = ConvergenceSpec()
    rollout: RolloutSpec = RolloutSpec()
    canaries: int = 3
    resume: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool | None = None
    # ``[model] chat_template_kwargs``: prompts are rendered as the engine renders them.
    chat_template_kwargs: dict[str, bool | int | float | str] = {}
    # The judges the reward asks, by the ``engine`` name of the rubrics' llm_judge criteria.
    judges: dict[str, JudgeEndpoint] = {}
    # ``[training] num_workers``: data-parallel ranks (Ray Train's TorchTrainer when > 1); each
    # rank's child learns its rank from the torch.distributed environment, not from here.
    num_workers: int = 1

    def problems(self) -> list[tuple[str, str]]:
        """(field, why) for each value that cannot run; empty when the spec is usable."""
        found: list[tuple[str, str]] = []
        g = self.grpo
        positive = {
            "grpo.max_steps": g.max_steps,
            "grpo.num_generations": g.num_generations,
            "grpo.per_device_train_batch_size": g.per_device_train_batch_size,
            "grpo.gradient_accumulation_steps": g.gradient_accumulation_steps,
            "grpo.max_prompt_length": g.max_prompt_length,
            "grpo.max_completion_length": g.max_completion_length,
            "grpo.save_steps": g.save_steps,
            "grpo.logging_steps": g.logging_steps,
            "lora.r": self.lora.r,
            "convergence.plateau_window": self.convergence.plateau_window,
            "convergence.plateau_patience": self.convergence.plateau_patience,
        }
        positive["num_workers"] = self.num_workers
        found.extend((name, "must be > 0") for name, value in positive.items() if value <= 0)
        if g.num_generations < 2:
            found.append(("grpo.num_generations", "a group needs at least 2 completions"))
        per_step = g.per_device_train_batch_size * g.gradient_accumulation_steps
        if g.num_generations > 0 and per_step % g.num_generations != 0:
            found.append(
                (
                    "grpo.num_generations",
                    f"per_device_train_batch_size * gradient_accumulation_steps ({per_step}) "
                    f"must be a multiple of num_generations ({g.num_generations})",
                )
            )
        if not math.isfinite(g.learning_rate) or g.learning_rate <= 0:
            found.append(("grpo.learning_rate", "must be a finite number > 0"))
        if not math.isfinite(g.beta) or g.beta < 0:
            found.append(("grpo.beta", "must be a finite number >= 0"))
        if not math.isfinite(g.temperature) or g.temperature <= 0:
            found.append(("grpo.temperature", "must be a finite number > 0"))
        r = self.rollout
        if r.sync_steps <= 0:
            found.append(("rollout.sync_steps", "must be > 0"))
        if r.max_resample_rounds < 0:
            found.append(("rollout.max_resample_rounds", "must be >= 0"))
        if not 0 < r.gpu_memory_utilization < 1:
            found.append(("rollout.gpu_memory_utilization", "must be between 0 and 1"))
        if self.canaries < 0:
            found.append(("canaries", "must be >= 0"))
        if not self.scenarios:
            found.append(("scenarios", "a training job needs at least one scenario"))
        if not self.lora.target_modules:
            found.append(("lora.target_modules", "must name at least one module"))
        for name, judge in sorted(self.judges.items()):
            for field, value in (("timeout_s", judge.timeout_s),
                                 ("batch_timeout_s", judge.batch_timeout_s)):
                if not math.isfinite(value) or value <= 0:
                    found.append((f"judges.{name}.{field}", "must be a finite number > 0"))
            if judge.max_concurrency < 1:
                found.append((f"judges.{name}.max_concurrency", "must be >= 1"))
            if judge.max_retries < 0:
                found.append((f"judges.{name}.max_retries", "must be >= 0"))
            if judge.max_tokens < 1:
                found.append((f"judges.{name}.max_tokens", "must be >= 1"))
            if not math.isfinite(judge.temperature) or judge.temperature < 0:
                found.append((f"judges.{name}.temperature", "must be a finite number >= 0"))
        return found


StopReason = Literal["completed", "plateau", "non_finite", "cancelled"]


class TrainerStarted(msgspec.Struct, frozen=True, tag="started", tag_field="event"):
    """Training is about to take its first step (model loaded, dataset built)."""

    total_steps: int
    resumed_from_step: int
    device: str
    dtype: str
    trainable_params: int
    world_size: int = 1  # data-parallel ranks ([training] num_workers); this child's rank:
    rank: int = 0


class TrainerMetric(msgspec.Struct, frozen=True, tag="metric", tag_field="event"):
    """One logged optimiser step. ``None`` where TRL did not log the value or it was not finite."""

    step: int
    reward_mean: float | None
    reward_std: float | None
    kl: float | None
    loss: float | None
    learning_rate: float | None
    completion_length: float | None
    seconds_per_step: float | None
    epoch: float | None
    # Share of this step's groups whose completions all got the same reward, after resampling
    # (they carry no gradient), and the same share at first draw, before any resampling.
    zero_variance_group_share: float | None = None
    zero_variance_first_draw_share: float | None = None
    extra_rollouts: int = 0
    rollout_tokens_per_second: float | None = None
    # Share of the rewards computed since the last metric whose rubric had a judge failure
    # (no usable verdict: the judge criterion counted for nothing); None when no reward was
    # computed or no rubric of the job has a judge.
    judge_failure_share: float | None = None


class TrainerCheckpoint(msgspec.Struct, frozen=True, tag="checkpoint", tag_field="event"):
    """A resumable checkpoint was written at ``path``."""

    step: int
    path: str


class TrainerStopped(msgspec.Struct, frozen=True, tag="stopped", tag_field="event"):
    """Training ended without an error; ``reason`` says why."""

    reason: StopReason
    step: int
    detail: str = ""


class TrainerReleased(msgspec.Struct, frozen=True, tag="released", tag_field="event"):
    """The last event of a run that did not fail: the child let go of the device.

    On CUDA, ``peak_device_bytes`` is the most memory torch allocated on the device during the
    job and ``final_device_bytes`` what was still allocated after the model, the optimiser and
    the rollout engine were released (0 when nothing leaked); both ``None`` on the CPU.
    """

    peak_device_bytes: int | None
    final_device_bytes: int | None


class AdapterSaved(msgspec.Struct, frozen=True, tag="adapter_saved", tag_field="event"):
    """The final adapter is in place at ``path``.

    ``sha256`` is the adapter hash recorded in its manifest (over the sorted (file, hash) list,
    what ``adapters.adapter_hash`` returns); ``manifest_sha256`` is the hash of the
    ``manifest.json`` bytes themselves.
    """

    path: str
    sha256: str
    manifest_sha256: str
    files: list[str]


class TrainerFailed(msgspec.Struct, frozen=True, tag="failed", tag_field="event"):
    """The child is about to exit with code 1; the traceback is on its stderr."""

    error: str
    detail: str


TrainerEvent = (
    TrainerStarted
    | TrainerMetric
    | TrainerCheckpoint
    | TrainerStopped
    | AdapterSaved
    | TrainerReleased
    | TrainerFailed
)

_event_encoder = msgspec.json.Encoder()
_event_decoder: msgspec.json.Decoder[TrainerEvent] = msgspec.json.Decoder(TrainerEvent)
_spec_decoder = msgspec.json.Decoder(TrainJobSpec)


def encode_event(event: TrainerEvent) -> bytes:
    """One event as a JSON line (with the trailing newline)."""
    return _event_encoder.encode(event) + b"\n"


def decode_event(line: bytes | str) -> TrainerEvent:
    """Parse one stdout line of the child; raises ValidationError for anything else."""
    try:
        return _event_decoder.decode(line)
    except msgspec.DecodeError as exc:
        raise ValidationError(f"not a trainer event: {exc}", data={"field": "event"}) from exc


def encode_spec(spec: TrainJobSpec) -> bytes:
    return msgspec.json.format(_event_encoder.encode(spec), indent=2) + b"\n"


def decode_spec(data: bytes | str, *, file: str | None = None) -> TrainJobSpec:
    """Parse and check a job spec; raises ValidationError naming the first bad field."""
    try:
        spec = _spec_decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise ValidationError(f"bad train job spec: {exc}", data={"file": file}) from exc
    except msgspec.DecodeError as exc:
        raise ValidationError(f"train job spec is not JSON: {exc}", data={"file": file}) from exc
    problems = spec.problems()
    if problems:
        field, why = problems[0]
        raise ValidationError(
            f"bad train job spec: {field} {why}",
            data={"file": file, "field": field, "problems": [f"{f}: {w}" for f, w in problems]},
        )
    return spec


def estimate_duration_minutes(
    spec: TrainJobSpec, *, seconds_per_completion_token: float = 0.02
) -> int:
    """A rough upper guess of the job's wall time, at least 1 minute.

    The cost of a GRPO step is dominated by generating ``per_step`` completions of up to
    ``max_completion_length`` tokens and one forward/backward over them; the rate defaults to a
    small model on one accelerator. The daemon calibrates ``seconds_per_completion_token`` from
    the ``seconds_per_step`` of finished jobs.
    """
    g = spec.grpo
    per_step = g.per_device_train_batch_size * g.gradient_accumulation_steps
    tokens_per_step = per_step * (g.max_completion_length + g.max_prompt_length / 8)
    seconds = g.max_steps * tokens_per_step * seconds_per_completion_token
    startup_seconds = 60.0
    return max(1, math.ceil((seconds + startup_seconds) / 60.0))
