"""A cluster's configuration (``<home>/<cluster>/cluster.toml``) and discovery of clusters.

Every field is documented here, once, in its ``Field(description=...)``; `docs/configuration.md`
is generated from these models (``modelsmith config schema``), so the two never drift apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from modelsmith.errors import ValidationError
from modelsmith.tomlfile import load_toml_model

CLUSTER_FILE = "cluster.toml"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    base: str = Field(description="Local directory of the base model (Hugging Face layout). "
                      "Relative paths are resolved against the cluster directory.")
    display_name: str | None = Field(default=None, description="Name shown in status output; "
                                     "defaults to the base directory's name.")
    max_model_len: int = Field(default=1024, ge=16, description="Context length the engine allots.")
    dtype: str = Field(default="auto", description="Weights dtype for the engine and trainer.")
    chat_template_kwargs: dict[str, bool | int | float | str] = Field(
        default_factory=dict, description="Variables passed to the model's chat template by the "
        "engine and the trainer alike, e.g. `{enable_thinking = false}` for Qwen3-style models "
        "(sent as the request's `chat_template_kwargs` to an OpenAI-compatible vLLM server).")


class EngineSection(_Section):
    kind: Literal["vllm", "openai"] = Field(default="vllm", description="In-process vLLM, or an "
                                            "OpenAI-compatible HTTP server.")
    url: str | None = Field(default=None, description="Base URL of the OpenAI-compatible server "
                            "(kind = \"openai\").")
    api_key_env: str | None = Field(default=None, description="Environment variable holding "
                                    "the API key (kind = \"openai\").")
    model: str | None = Field(default=None, min_length=1, description="Name of the served model, "
                              "sent as `model` (kind = \"openai\"): vLLM's --served-model-name or "
                              "a hosted API's model id. Default: the resolved path of [model] base.")
    gpu_memory_utilization: float = Field(default=0.85, gt=0, le=1, description="vLLM's share of "
                                          "GPU memory.")
    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs the engine spans.")
    max_lora_rank: int = Field(default=16, ge=1, description="Largest LoRA rank the engine accepts.")
    max_loras: int = Field(default=4, ge=1, description="Adapters held in the engine at once.")


class SamplingSection(_Section):
    """Eval sampling. A value left unset comes from the model's own `generation_config.json`
    (`temperature`, `top_p`, `max_new_tokens`; `do_sample = false` means temperature 0), and
    failing that from the default shown here: cluster.toml > generation_config.json > default."""

    temperature: float | None = Field(default=None, ge=0, description="Eval sampling "
                                      "temperature (0 = greedy, deterministic). Unset: the "
                                      "model's generation_config.json, else 0.")
    top_p: float | None = Field(default=None, gt=0, le=1, description="Nucleus sampling for "
                                "eval. Unset: the model's generation_config.json, else 1.")
    max_tokens: int | None = Field(default=None, ge=1, description="Most new tokens per eval "
                                   "answer. Unset: the model's generation_config.json "
                                   "`max_new_tokens`, else 64.")
    seed: int = Field(default=0, description="Sampling seed for eval.")
    stop: list[str] = Field(default_factory=list, description="Stop strings: generation ends "
                            "before the first one (it is not part of the answer).")


class ScoringSection(_Section):
    strip_reasoning: bool = Field(default=False, description="Score the answer without its "
                                  "reasoning: `<think>...</think>` blocks (or a server's "
                                  "`reasoning_content`) are removed before the rubric sees the "
                                  "answer; results keep both (`response`, `reasoning`).")


class ThresholdSection(_Section):
    composite: float = Field(default=0.8, ge=0, le=1, description="Gate: the weighted mean "
                             "score over the evaluated scenarios must reach this.")
    held_out: float = Field(default=0.75, ge=0, le=1, description="Gate: the held-out set's "
                            "score must reach this.")


class LoraSection(_Section):
    r: int = Field(default=8, ge=1, description="LoRA rank.")
    alpha: int = Field(default=16, ge=1, description="LoRA alpha.")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj",
                                      "o_proj", "gate_proj", "up_proj", "down_proj"],
                                      description="Module names the adapter wraps.")


class TrainingSection(_Section):
    method: Literal["grpo"] = Field(default="grpo", description="Post-training method.")
    max_steps: int = Field(default=200, ge=1, description="Most optimizer steps per job.")
    learning_rate: float = Field(default=5e-5, gt=0, description="Peak learning rate.")
    num_generations: int = Field(default=4, ge=2, description="GRPO group size (completions "
                                 "per prompt).")
    per_device_train_batch_size: int = Field(default=4, ge=1, description="Completions per "
                                             "device step; a multiple of num_generations.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, description="Steps accumulated "
                                             "per update.")
    max_completion_length: int = Field(default=32, ge=1, description="Most tokens per sampled "
                                       "completion.")
    max_prompt_length: int = Field(default=256, ge=8, description="Prompts are cut to this.")
    beta: float = Field(default=0.04, ge=0, description="KL penalty coefficient.")
    temperature: float = Field(default=1.0, gt=0, description="Sampling temperature of rollouts.")
    seed: int = Field(default=0, description="Training seed.")
    save_steps: int = Field(default=50, ge=1, description="Checkpoint every N steps (resume "
                            "point after a crash).")
    near_miss_margin: float = Field(default=0.0, ge=0, le=1, description="Also train on core "
                                    "scenarios that passed by less than this margin.")
    plateau_window: int = Field(default=10, ge=2, description="Steps in the reward moving "
                                "average.")
    plateau_patience: int = Field(default=5, ge=1, description="Windows without improvement "
                                  "before an early stop.")
    plateau_min_delta: float = Field(default=0.005, ge=0, description="Improvement that counts.")
    min_steps: int = Field(default=20, ge=0, description="Never stop early before this step.")
    lora: LoraSection = Field(default_factory=LoraSection, description="The adapter's shape.")
    rollout: Literal["auto", "vllm", "hf"] = Field(default="auto", description="What samples "
                                                  "GRPO completions: `vllm` (an engine in the "
                                                  "trainer, the in-training adapter loaded every "
                                                  "`rollout_sync_steps`; sleeps between rollouts "
                                                  "on CUDA), `hf` (transformers generate), `auto` "
                                                  "(vllm on CUDA when installed, else hf: on the "
                                                  "CPU the engine's start costs more than a small "
                                                  "job's rollouts save; bench/rollout_throughput.py).")
    rollout_sync_steps: int = Field(default=1, ge=1, description="vllm rollouts: load the "
                                    "in-training adapter into the engine every N steps.")
    rollout_max_resample_rounds: int = Field(default=2, ge=0, description="Regenerate a group "
                                             "whose completions all got the same reward (no "
                                             "gradient) up to N times; a step costs at most "
                                             "(1 + N) times its completions.")
    rollout_gpu_memory_utilization: float = Field(default=0.3, gt=0, lt=1, description="vllm "
                                                  "rollouts: the device share of the trainer's "
                                                  "own engine while it is awake.")
    num_workers: int = Field(default=1, ge=1, le=256, description="Data-parallel trainer "
                             "workers per job. More than 1 needs the Ray backend (`[ray] "
                             "address` in modelsmith.toml): the job runs as Ray Train's "
                             "TorchTrainer, one worker per `[ray.trainer]` share (GPUs, CPUs), "
                             "on one node or several. See docs/scale.md.")
    retries: int = Field(default=0, ge=0, le=10, description="When the trainer's process, "
                         "Ray worker or node dies mid-job (killed by a signal, out of memory, "
                         "a lost node), run the job again from its last checkpoint up to this "
                         "many times; the ledger still records the job's end once. 0: the job "
                         "fails with a TrainerError.")
    device: Literal["auto", "shared"] | Annotated[int, Field(ge=0)] = Field(
        default="auto", description="Where the trainer runs. \"auto\": a GPU that no engine "
        "lives on if the box has one (the least busy), else a shared one, whose engines sleep "
        "(level 1) while it trains and wake before the adapter is loaded; \"shared\": always a "
        "GPU with engines (they sleep); an index: that GPU. On a CPU box: the CPU, engines "
        "stay awake. See docs/operations.md, \"Memory planning and sleep\".")


class PolicySection(_Section):
    max_regressions: int = Field(default=0, ge=0, description="Most scenarios that passed under "
                                 "the champion and fail under the candidate.")
    required_approvals: int = Field(default=1, ge=1, description="Reviewer signatures needed to "
                                    "promote.")
    autonomous: bool = Field(default=False, description="Run the loop without being asked.")
    max_iterations: int = Field(default=3, ge=1, description="Autonomous: most iterations per run.")
    stop_when_gate_passes: bool = Field(default=True, description="Autonomous: request promotion "
                                        "and stop once the gate passes.")
    patience_iterations: int = Field(default=2, ge=1, description="Autonomous: stop after this "
                                     "many iterations without improvement.")
    device_seconds_per_iteration: float | None = Field(default=None, gt=0, description="Budget: "
                                                       "most device time per iteration.")
    device_seconds_per_day: float | None = Field(default=None, gt=0, description="Budget: most "
                                                 "device time per day.")
    gate_on: Literal["point", "lower_bound"] = Field(default="point", description="What the "
                                                     "composite and held-out gates compare with "
                                                     "their thresholds: the point score, or the "
                                                     "lower bound of its 95% bootstrap interval.")
    regression_alpha: float = Field(default=0.05, ge=0, lt=1, description="Refuse a "
                                    "candidate that is significantly worse than the champion at "
                                    "this level (exact McNemar on pass/fail or sign test on "
                                    "scores, two-sided, paired by scenario; check "
                                    "`paired_regression`); 0 turns the check off.")
    min_judge_agreement: float | None = Field(default=None, ge=-1, le=1, description="Refuse a "
                                              "promotion whose eval used a judge without a "
                                              "`judge check` of the current judge, template and "
                                              "calibration set with Cohen's kappa at least this "
                                              "(check `judge_agreement`; docs/judges.md). Unset: "
                                              "off.")


class EvalSection(_Section):
    quick_size: int = Field(default=32, ge=1, description="Scenarios in a --quick run "
                            "(a deterministic stratified subset).")
    workers: int = Field(default=0, ge=0, description="Scoring threads (0 = automatic).")
    bootstrap_resamples: int = Field(default=2000, ge=100, le=100_000, description="Resamples "
                                     "of the scenario bootstrap behind every 95% interval.")
    bootstrap_seed: int = Field(default=0, description="Seed of the bootstrap, so a summary's "
                                "intervals can be recomputed exactly.")


class SynthesisSection(_Section):
    generator: str | None = Field(default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
                                  description="A programmatic generator, `package.module:function`"
                                  ": called with a failure pattern, its source scenarios and a count, "
                                  "it returns scenario dicts (checked like a teacher's). `synth` "
                                  "uses it when no --teacher is named.")
    per_iteration: int = Field(default=0, ge=0, le=1000, description="Autonomous: scenarios to "
                               "synthesise per failure pattern before each training (0: off; needs "
                               "`generator`). Its time counts against the device budget.")
    near_duplicate_threshold: float = Field(default=90.0, gt=0, le=100, description="Two prompts "
                                            "whose normalised character similarity (rapidfuzz "
                                            "`fuzz.ratio`, 0-100) is at least this are "
                                            "near-duplicates: a candidate that close to a held-out "
                                            "prompt is refused, to any other dropped.")


class ClusterConfig(_Section):
    """``cluster.toml``: everything that defines one specialist."""

    name: str | None = Field(default=None, description="Cluster name; defaults to the directory "
                             "name and must match it.")
    domain: str = Field(default="general", description="Domain label shown in status and bundles.")
    model: ModelSection = Field(description="The base model.")
    engine: EngineSection = Field(default_factory=EngineSection, description="Inference engine.")
    sampling: SamplingSection = Field(default_factory=SamplingSection, description="Eval sampling.")
    scoring: ScoringSection = Field(default_factory=ScoringSection, description="How answers "
                                    "are read before scoring.")
    thresholds: ThresholdSection = Field(default_factory=ThresholdSection, description="Gates.")
    training: TrainingSection = Field(default_factory=TrainingSection, description="GRPO + LoRA.")
    policy: PolicySection = Field(default_factory=PolicySection, description="Promotion and "
                                  "autonomy policy.")
    eval: EvalSection = Field(default_factory=EvalSection, description="Eval runs.")
    synthesis: SynthesisSection = Field(default_factory=SynthesisSection, description="Synthetic "
                                        "scenarios from failure patterns (`modelsmith synth`).")


@dataclass(frozen=True, slots=True)
class Cluster:
    """A loaded cluster: its name, directory and validated config."""

    name: str
    root: Path
    config: ClusterConfig

    @property
    def base_model(self) -> Path:
        base = Path(self.config.model.base)
        return base if base.is_absolute() else (self.root / base).resolve()

    @property
    def model_name(self) -> str:
        return self.config.model.display_name or self.base_model.name

    @property
    def ledger_path(self) -> Path:
        return self.root / "ledger.jsonl"

    @property
    def scenarios_dir(self) -> Path:
        return self.root / "scenarios"

    def evals_dir(self) -> Path:
        return self.root / "evals"

    def logs_dir(self) -> Path:
        return self.root / "logs"


def load_cluster(root: Path) -> Cluster:
    """Read and validate ``root/cluster.toml``; raises ValidationError naming file and field."""
    path = root / CLUSTER_FILE
    name = root.name
    if not _NAME.match(name):
        raise ValidationError(
            f"{root}: cluster directory name {name!r} must be lowercase letters, digits, '.', '_' "
            "or '-'",
            data={"file": str(path), "field": None, "cluster": name},
        )
    config = load_toml_model(path, ClusterConfig, extra={"cluster": name})
    if config.name is not None and config.name != name:
        raise ValidationError(
            f"{path}: field 'name': {config.name!r} does not match the directory name {name!r}",
            data={"file": str(path), "field": "name", "cluster": name},
        )
    return Cluster(name=name, root=root, config=config)


@dataclass(frozen=True, slots=True)
class ClusterProblem:
    cluster: str
    file: str
    field: str | None
    message: str


def discover_clusters(home: Path) -> tuple[dict[str, Cluster], list[ClusterProblem]]:
    """Every ``<home>/*/cluster.toml``; a bad one is reported and does not stop the others."""
    clusters: dict[str, Cluster] = {}
    problems: list[ClusterProblem] = []
    if not home.is_dir():
        return clusters, problems
    for candidate in sorted(home.iterdir()):
        if not (candidate / CLUSTER_FILE).is_file():
            continue
        try:
            cluster = load_cluster(candidate)
        except ValidationError as exc:
            problems.append(
                ClusterProblem(
                    cluster=candidate.name,
                    file=str(exc.data.get("file", candidate / CLUSTER_FILE)),
                    field=exc.data.get("field"),
                    message=exc.message,
                )
            )
            continue
        clusters[cluster.name] = cluster
    return clusters, problems
