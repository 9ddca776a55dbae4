"""A Modelsmith home with the real artefacts the promotion gate judges, made on tiny data.

Scenario files, adapter directories (with the adapter manifest written by
``save_adapter_atomically``), training manifests built by the trainer's own ``build_manifest``,
trainer metric logs, eval ``results.jsonl`` / ``summary.json`` and the ledger entries the eval
and train services append. Reviewers are real SSH keys made by ``ssh-keygen``.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec

from modelsmith.daemon.app import engine_spec_for
from modelsmith.gpu.adapters import save_adapter_atomically
from modelsmith.gpu.engine import (
    Completion,
    EngineInfo,
    EngineLifecycle,
    EngineState,
    PromptInput,
    Sampling,
)
from modelsmith.gpu.engines import EnginePool
from modelsmith.loop.cluster.config import Cluster
from modelsmith.loop.cluster.fleet import ClusterRuntime, Fleet
from modelsmith.loop.eval.run import group_scores, weighted_mean
from modelsmith.loop.eval.stats import bootstrap_ci95
from modelsmith.loop.records.events import (
    EvalFinished,
    EvalStarted,
    IterationAdvanced,
    ScenariosChanged,
)
from modelsmith.loop.records.ledger import Ledger
from modelsmith.loop.records.ssh_sign import NAMESPACE, sign_with_ssh_keygen
from modelsmith.loop.scoring.scenarios import load_catalog, scenario_hash
from modelsmith.loop.train.training_set import build_manifest
from modelsmith.rpc.schema.evals import (
    CriterionOutcome,
    EvalSummary,
    GateResult,
    RegressionReport,
    ScenarioResult,
)

CLUSTER = "rtb-pricing"
CORE_IDS = [f"core-{i}" for i in range(1, 7)]
HELD_IDS = [f"held-{i}" for i in range(1, 4)]


def cluster_toml(required_approvals: int = 1, max_regressions: int = 0) -> str:
    return f"""\
domain = "adtech"

[model]
base = "models/tiny-llama"
display_name = "tiny-llama"

[thresholds]
composite = 0.8
held_out = 0.6

[policy]
required_approvals = {required_approvals}
max_regressions = {max_regressions}
"""


def _scenario(scenario_id: str) -> dict[str, Any]:
    return {"id": scenario_id, "domain": "pricing", "tags": ["bid"],
            "prompt": f"What is the floor price for {scenario_id}?", "reference": "4",
            "rubric": {"criteria": [{"type": "exact"}]}}


class _AdapterFiles:
    """Stands in for a PEFT model: what its save_pretrained writes (tiny, distinct bytes)."""

    def __init__(self, content: bytes) -> None:
        self.content = content

    def save_pretrained(self, save_directory: str, /, **kwargs: Any) -> None:
        directory = Path(save_directory)
        (directory / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
        (directory / "adapter_model.safetensors").write_bytes(self.content)


@dataclass
class Reviewer:
    name: str
    key_path: Path
    public_line: str

    def sign(self, statement: bytes, namespace: str = NAMESPACE) -> str:
        return sign_with_ssh_keygen(statement, self.key_path, namespace)


def make_reviewer(directory: Path, name: str) -> Reviewer:
    directory.mkdir(parents=True, exist_ok=True)
    key_path = directory / f"id_{name}"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f",
                    str(key_path)], check=True, timeout=30)
    return Reviewer(name, key_path, Path(f"{key_path}.pub").read_text().strip())


def allow_signers(home: Path, *lines: str) -> None:
    (home / "allowed_signers").write_text("\n".join(lines) + "\n")


class RecordingEngine:
    """The engine at the hardware boundary (the whole Engine Protocol), warm from the start:
    remembers which adapters it was told to load; answers every prompt with "4"."""

    kind = "vllm"

    def __init__(self) -> None:
        self.lifecycle = EngineLifecycle("recording")
        self.lifecycle.set(EngineState.WARM)
        self.loaded: list[tuple[str, Path]] = []

    def info(self) -> EngineInfo:
        return EngineInfo(name="recording", model="tiny-llama", kind=self.kind,
                          state=self.lifecycle.state, adapters=[n for n, _ in self.loaded])

    async def wait_ready(self, timeout: float) -> None:  # noqa: ASYNC109 (the contract names it)
        await self.lifecycle.wait_ready(timeout)

    async def generate(self, prompt: PromptInput, sampling: Sampling, *,
                       adapter: str | None = None) -> Completion:
        self.lifecycle.require(EngineState.WARM)
        return Completion(text="4", token_count=1, finish_reason="stop")

    async def generate_many(self, prompts: Sequence[PromptInput], sampling: Sampling, *,
                            adapter: str | None = None) -> AsyncIterator[tuple[int, Completion]]:
        for index, prompt in enumerate(prompts):
            yield index, await self.generate(prompt, sampling, adapter=adapter)

    async def load_adapter(self, name: str, path: Path) -> None:
        self.loaded.append((name, path))

    async def unload_adapter(self, name: str) -> None:
        self.loaded = [(n, p) for n, p in self.loaded if n != name]

    async def sleep(self, level: int = 1) -> None:
        self.lifecycle.set(EngineState.SLEEPING)

    async def wake_up(self) -> None:
        self.lifecycle.set(EngineState.WARM)

    async def health(self) -> bool:
        return True

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()
        await anyio.sleep_forever()


def engine_pool_for(cluster: Cluster) -> tuple[EnginePool, RecordingEngine]:
    """The real EnginePool, with a recording engine in place of vLLM."""
    engine = RecordingEngine()
    pool = EnginePool(factory=lambda name, spec: engine)  # type: ignore[arg-type,return-value]
    pool.add_cluster(cluster.name, engine_spec_for(cluster))
    return pool, engine


class PromotionHome:
    """Builds one cluster's artefacts; append to the ledger only through :attr:`ledger`."""

    def __init__(self, home: Path, *, required_approvals: int = 1, max_regressions: int = 0
                 ) -> None:
        self.home = home
        self.root = home / CLUSTER
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "cluster.toml").write_text(cluster_toml(required_approvals, max_regressions))
        for set_name, ids in (("core", CORE_IDS), ("held-out", HELD_IDS)):
            folder = self.root / "scenarios" / set_name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "s.jsonl").write_text(
                "".join(json.dumps(_scenario(i)) + "\n" for i in ids))
        self.ledger = Ledger.open(self.root / "ledger.jsonl")
        self.catalog = load_catalog(self.root / "scenarios")
        self.ledger.append(ScenariosChanged(versions=self.catalog.versions(), counts={},
                                            changed=["core", "held-out"]))

    # -- training -------------------------------------------------------------------------------
    def add_adapter(self, iteration: int, *, source_eval: str = "base-eval",
                    trained_ids: list[str] | None = None, manifest: dict[str, Any] | None = None
                    ) -> str:
        adapter = f"iter-{iteration}"
        directory = self.root / "adapters" / adapter
        built = save_adapter_atomically(_AdapterFiles(f"weights {iteration}".encode()),
                                        directory, base_model="models/tiny-llama")
        job_id = f"train-{iteration}"
        if manifest is None:
            chosen = [self.catalog.require(i) for i in (trained_ids or CORE_IDS[:2])]
            manifest = msgspec.to_builtins(build_manifest(
                scenarios=chosen, catalog=self.catalog, job_id=job_id, cluster=CLUSTER,
                iteration=iteration, eval_tag=source_eval, base_model="models/tiny-llama",
                init_adapter=None, near_miss_margin=0.0, metrics_log=f"logs/train-{job_id}.log",
                created_at="2026-11-26T10:00:00Z"))
        manifest_bytes = msgspec.json.format(msgspec.json.encode(manifest), indent=2)
        (directory / "training_manifest.json").write_bytes(manifest_bytes)
        logs = self.root / "logs"
        logs.mkdir(exist_ok=True)
        (logs / f"train-{job_id}.log").write_text("".join(
            json.dumps({"event": "metric", "step": step, "reward_mean": 0.1 + 0.02 * step,
                        "reward_std": 0.1, "kl": 0.001 * step, "loss": 0.5 - 0.01 * step,
                        "learning_rate": 5e-5, "completion_length": 8.0,
                        "seconds_per_step": 0.1, "epoch": None}) + "\n"
            for step in range(1, 21)) + "not json\n")
        self.ledger.append(IterationAdvanced(
            iteration=iteration, adapter=adapter, adapter_hash=built.adapter_sha256,
            train_job=job_id, source_eval_tag=source_eval,
            training_manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(),
            stop_reason="completed", steps=20))
        return adapter

    # -- evals ----------------------------------------------------------------------------------
    def add_eval(self, tag: str, adapter: str | None, passed_ids: set[str], *,
                 type: str = "full", quick: bool = False, iteration: int = 0,
                 scenario_sets: dict[str, str] | None = None,
                 engine: str | None = None) -> EvalSummary:
        wanted = {"full": CORE_IDS + HELD_IDS, "core": CORE_IDS, "held_out": HELD_IDS}[type]
        results = [self._result(i, i in passed_ids) for i in sorted(wanted)]
        directory = self.root / "evals" / tag
        directory.mkdir(parents=True, exist_ok=True)
        results_bytes = b"".join(msgspec.json.encode(r) + b"\n" for r in results)
        (directory / "results.jsonl").write_bytes(results_bytes)
        held = [r for r in results if r.set == "held-out"]
        composite = round(weighted_mean(results), 6)
        held_out = round(weighted_mean(held), 6) if held else None
        adapter_hash = None
        if adapter is not None:
            manifest = json.loads((self.root / "adapters" / adapter / "manifest.json").read_text())
            adapter_hash = manifest["adapter_sha256"]
        sets = scenario_sets or self.catalog.versions()
        self.ledger.append(EvalStarted(tag=tag, job_id=f"job-{tag}", type=type, quick=quick,
                                       scenarios=len(results), scenario_sets=sets,
                                       adapter=adapter, adapter_hash=adapter_hash, engine=engine))
        summary = EvalSummary(
            cluster=CLUSTER, tag=tag, job_id=f"job-{tag}", type=type, quick=quick, engine=engine,
            model="tiny-llama", base_model=str(self.root / "models/tiny-llama"),
            iteration=iteration, adapter=adapter, adapter_hash=adapter_hash,
            scenario_sets=sets, scenarios=len(results),
            scored=len(results), judge_errors=0, composite=composite, held_out=held_out,
            by_set=group_scores(results, "set"), by_tag=group_scores(results, "tags"),
            gates={"composite": GateResult(value=composite, threshold=0.8,
                                           passed=composite >= 0.8)},
            passed=composite >= 0.8,
            regressions=RegressionReport(baseline_tag=None, compared=0, count=0, scenario_ids=[]),
            started_at="2026-11-26T10:00:00Z", finished_at="2026-11-26T10:01:00Z",
            duration_s=60.0, results_sha256=hashlib.sha256(results_bytes).hexdigest(),
            composite_ci95=bootstrap_ci95([r.score for r in results], [r.weight for r in results]),
            held_out_ci95=bootstrap_ci95([r.score for r in held], [r.weight for r in held]))
        summary_bytes = msgspec.json.format(msgspec.json.encode(summary), indent=2)
        (directory / "summary.json").write_bytes(summary_bytes)
        self.ledger.append(EvalFinished(
            tag=tag, job_id=summary.job_id, composite=composite, held_out=held_out,
            passed=summary.passed, summary_sha256=hashlib.sha256(summary_bytes).hexdigest(),
            results_sha256=summary.results_sha256, adapter=adapter, engine=engine))
        return summary

    def _result(self, scenario_id: str, passed: bool) -> ScenarioResult:
        scenario = self.catalog.require(scenario_id)
        return ScenarioResult(
            scenario_id=scenario_id, set=scenario.set, domain=scenario.domain,
            tags=list(scenario.tags), weight=1.0, scenario_hash=scenario_hash(scenario),
            prompt=str(scenario.prompt), response="4" if passed else "five",
            reference=scenario.reference, score=1.0 if passed else 0.0, passed=passed,
            pass_mark=0.5, judge_error=False,
            criteria=[CriterionOutcome(name="exact", type="exact", weight=1.0,
                                       score=1.0 if passed else 0.0, passed=passed,
                                       detail="ok" if passed else "expected 4",
                                       error_kind=None if passed else "wrong_answer")],
            finish_reason="stop", completion_tokens=2)

    # -- the usual story --------------------------------------------------------------------------
    def trained_candidate(self, iteration: int = 1, *, passed: set[str] | None = None) -> str:
        """A base eval, iteration N trained on its failures, and a passing full eval of it."""
        if not self.ledger.find(EvalFinished):
            self.add_eval("base-eval", None, set(CORE_IDS[2:] + HELD_IDS[:1]))
        adapter = self.add_adapter(iteration)
        self.add_eval(f"iter-{iteration}-full", adapter,
                      passed if passed is not None else set(CORE_IDS + HELD_IDS[:2]),
                      iteration=iteration)
        return adapter

    def open(self) -> tuple[Fleet, ClusterRuntime]:
        """The daemon's view: discover the home and open the cluster (ledger re-verified)."""
        fleet = Fleet(self.home)
        fleet.discover()
        runtime = fleet.get(CLUSTER)
        runtime.open()
        assert runtime.status_error is None, runtime.status_error
        self.ledger = runtime.require_ledger()  # one writer from here on
        return fleet, runtime
