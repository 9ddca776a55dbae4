"""The GRPO reward asks the eval's judge: batched, cached, bounded, failures counted; a judge the
trainer cannot reach refuses the job. A real local HTTP judge (tests/support/model_server.py)
and real OpenAI engines in the child's judge clients; one real TRL run on the tiny model."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from support.model_server import ModelServer, serve_model

from modelsmith.daemon.config import DaemonConfig
from modelsmith.gpu.named_engines import NamedEngines
from modelsmith.gpu.trainer_control import StopState
from modelsmith.gpu.trainer_reward import JudgeClients, RewardScorer, make_reward_function
from modelsmith.gpu.trainer_spec import (
    ConvergenceSpec,
    GrpoSpec,
    JudgeEndpoint,
    TrainerMetric,
    TrainerStopped,
    TrainJobSpec,
    decode_spec,
    encode_spec,
)
from modelsmith.loop.cluster.config import load_cluster
from modelsmith.loop.scoring.scenarios import Scenario
from modelsmith.loop.train.reward_judges import JudgeUnreachable, reward_judges

TEMPLATE = "Grade this.\nAnswer: <<{response}>>\nReply SCORE: 0 or SCORE: {scale}"


def judge_by_answer(prompt: str, index: int) -> str:
    """A deterministic judge: 1 for an answer with "yes", 0 otherwise, malformed for "maybe"."""
    answer = prompt.split("<<", 1)[1].split(">>", 1)[0]
    if "maybe" in answer:
        return "I cannot decide."
    return "reasoning...\nSCORE: 1" if "yes" in answer else "SCORE: 0"


def judged_scenarios(count: int, *, engine: str = "grader", extra: bool = False) -> list[Scenario]:
    criteria: list[dict[str, Any]] = [{"type": "llm_judge", "engine": engine, "template": TEMPLATE}]
    if extra:
        criteria.append({"type": "contains", "value": "campaign"})
    return [msgspec.convert({"id": f"live-{i}", "set": "core", "domain": "adtech", "prompt": f"Is campaign {i} live?",
                             "rubric": {"criteria": criteria}}, Scenario) for i in range(count)]


@pytest.fixture
def judge_server() -> Iterator[ModelServer]:
    with serve_model(judge_by_answer, delay_s=0.02) as server:
        yield server


def clients_for(server: ModelServer, **changes: Any) -> JudgeClients:
    endpoint = JudgeEndpoint(url=server.url, model="tiny", **changes)
    clients = JudgeClients({"grader": endpoint})
    clients.start(ready_timeout_s=10)
    return clients


def test_a_judge_only_rubric_rewards_what_the_judge_says_in_one_batch(judge_server: ModelServer) -> None:
    scenarios = judged_scenarios(2)
    prompts = ["p0", "p1"]
    clients = clients_for(judge_server)
    try:
        scorer = RewardScorer(prompts, scenarios, clients)
        rewards = scorer.score_many(["p0", "p0", "p1", "p1"], ["yes", "no", "nope", "yes it is"])
        assert rewards == [1.0, 0.0, 0.0, 1.0]
        assert len(judge_server.requests) == 4
        assert judge_server.max_in_flight > 1  # the batch went out together, not one by one
        assert scorer.take_judge_failure_share() == 0.0
        # The same completions again: every verdict comes from the cache.
        assert scorer.score_many(["p0", "p1"], ["yes", "no"]) == [1.0, 0.0]
        assert len(judge_server.requests) == 4 and clients.cache_hits == 2
    finally:
        clients.close()


def test_identical_completions_of_a_group_are_judged_once(judge_server: ModelServer) -> None:
    clients = clients_for(judge_server)
    try:
        scorer = RewardScorer(["p0"], judged_scenarios(1), clients)
        assert scorer.score_many(["p0"] * 4, ["yes"] * 4) == [1.0] * 4
        assert len(judge_server.requests) == 1
    finally:
        clients.close()


def test_malformed_verdicts_are_judge_failures_counted_in_the_share(judge_server: ModelServer) -> None:
    clients = clients_for(judge_server)
    try:
        scorer = RewardScorer(["p0"], judged_scenarios(1, extra=True), clients)
        rewards = scorer.score_many(["p0"] * 4, ["yes campaign", "maybe campaign", "no", "maybe"])
        # A failed judge criterion counts for nothing: the other criterion decides the reward.
        assert rewards == [1.0, 1.0, 0.0, 0.0]
        assert scorer.take_judge_failure_share() == 0.5
        assert scorer.take_judge_failure_share() is None  # nothing scored since
        # The judge's reply is cached, a malformed one too: the same completion, the same verdict.
        before = len(judge_server.requests)
        assert scorer.score_many(["p0"], ["maybe campaign"]) == [1.0]
        assert len(judge_server.requests) == before
        assert scorer.take_judge_failure_share() == 1.0
    finally:
        clients.close()


def test_a_judge_slower_than_the_batch_bound_is_a_judge_failure_not_a_hang() -> None:
    released = threading.Event()

    def slow(prompt: str, index: int) -> str:
        released.wait(10)  # held until the test lets go
        return "SCORE: 1"

    with serve_model(slow) as server:
        clients = clients_for(server, batch_timeout_s=0.5, timeout_s=5.0, max_retries=0)
        try:
            scorer = RewardScorer(["p0"], judged_scenarios(1), clients)
            assert scorer.score_many(["p0", "p0"], ["yes", "yes again"]) == [0.0, 0.0]
            assert scorer.take_judge_failure_share() == 1.0
            released.set()
            # A call that failed is not cached: the next batch asks again, and gets the verdict.
            assert scorer.score_many(["p0"], ["yes"]) == [1.0]
        finally:
            released.set()
            clients.close()


def test_a_judge_that_does_not_answer_at_start_is_an_engine_error() -> None:
    from modelsmith.errors import EngineError

    clients = JudgeClients({"grader": JudgeEndpoint(url="http://127.0.0.1:9/v1", model="x",
                                                    timeout_s=1.0)})
    try:
        with pytest.raises(EngineError):
            clients.start(ready_timeout_s=1.0)
    finally:
        clients.close()


def test_the_reward_function_scores_through_the_same_scorer(judge_server: ModelServer) -> None:
    clients = clients_for(judge_server)
    try:
        scorer = RewardScorer(["p0"], judged_scenarios(1), clients)
        reward = make_reward_function(scorer, StopState())
        assert reward(completions=["yes", "no"], scenario_id=["live-0", "live-0"]) == [1.0, 0.0]
        assert reward(completions=["x"], scenario_id=["live-0"], rubric_rewards=[0.25]) == [0.25]
    finally:
        clients.close()


# ---------------------------------------------------------------------------------------------
# What the daemon puts in the spec, or refuses


def cluster_at(tmp_path: Path, engine_toml: str) -> Any:
    root = tmp_path / "shop"
    (root / "model").mkdir(parents=True)
    (root / "cluster.toml").write_text(
        f'domain = "d"\n[model]\nbase = "model"\n{engine_toml}\n'
        "[sampling]\ntemperature = 0.0\nmax_tokens = 32\n")
    return load_cluster(root)


def named(engines: dict[str, Any], home: Path) -> NamedEngines:
    return NamedEngines.from_config(DaemonConfig.model_validate({"engines": engines}), home=home)


def test_an_http_judge_becomes_a_spec_entry_with_the_key_variable_never_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JUDGE_KEY", "sk-secret-value")
    registry = named({"grader": {"kind": "openai", "url": "http://judge:8000/v1", "model": "j",
                                 "api_key_env": "JUDGE_KEY", "timeout_s": 20}}, tmp_path)
    judges = reward_judges(judged_scenarios(2), cluster_at(tmp_path, ""), registry)
    assert judges == {"grader": JudgeEndpoint(
        url="http://judge:8000/v1", model="j", api_key_env="JUDGE_KEY", timeout_s=20.0,
        batch_timeout_s=60.0, max_concurrency=16, max_retries=2, retry_max_delay_s=10.0,
        temperature=0.0, max_tokens=32)}
    spec = TrainJobSpec(job_id="j", cluster="shop", base_model="m", output_dir="o", work_dir="w",
                        scenarios=[{"id": "x"}], judges=judges)
    encoded = encode_spec(spec)
    assert b"sk-secret-value" not in encoded and b"JUDGE_KEY" in encoded
    assert decode_spec(encoded).judges == judges


@pytest.mark.parametrize(("engine", "engines", "engine_toml"), [
    ("cluster", {}, ""),  # the cluster's in-process vLLM engine
    ("local", {"local": {"kind": "vllm", "model": "models/judge"}}, ""),
])
def test_a_judge_the_trainer_cannot_reach_refuses_the_job_naming_the_criterion(
    tmp_path: Path, engine: str, engines: dict[str, Any], engine_toml: str
) -> None:
    scenarios = judged_scenarios(1, engine=engine, extra=True)
    with pytest.raises(JudgeUnreachable) as caught:
        reward_judges(scenarios, cluster_at(tmp_path, engine_toml), named(engines, tmp_path))
    assert caught.value.code == 1002
    assert caught.value.data["scenario"] == "live-0"
    assert caught.value.data["criterion"] == "llm_judge"
    assert caught.value.data["engine"] == engine
    assert caught.value.data["field"] == "rubric.criteria[0].engine"


def test_the_cluster_judge_on_an_http_engine_is_reachable(tmp_path: Path) -> None:
    cluster = cluster_at(tmp_path, '[engine]\nkind = "openai"\nurl = "http://c:1/v1"\nmodel = "m"')
    judges = reward_judges(judged_scenarios(1, engine="cluster"), cluster, named({}, tmp_path))
    assert judges["cluster"].url == "http://c:1/v1" and judges["cluster"].model == "m"


def test_a_spec_whose_judge_criterion_has_no_endpoint_is_a_bad_spec() -> None:
    from modelsmith.errors import ValidationError
    from modelsmith.gpu.trainer_reward import check_judges

    with pytest.raises(ValidationError) as caught:
        check_judges(judged_scenarios(1), {})
    assert caught.value.data["engine"] == "grader"
    assert caught.value.data["field"] == "scenarios[0].rubric.criteria[0].engine"


# ---------------------------------------------------------------------------------------------
# A real GRPO run whose only criterion is the judge


@pytest.mark.slow
def test_grpo_on_a_judge_only_rubric_learns_what_the_judge_rewards(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from modelsmith.examples.tinymodel import warm_start
    from modelsmith.gpu.trainer_process import run_trainer

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    warm_start(model_dir, [(f"Is campaign {i} live?", a) for i in range(4) for a in ("yes", "no")])
    with serve_model(judge_by_answer) as server:
        scenarios = [msgspec.to_builtins(s) for s in judged_scenarios(4)]
        spec = TrainJobSpec(
            job_id="job-j", cluster="adtech", base_model=str(model_dir),
            output_dir=str(tmp_path / "adapters" / "iter-1"), work_dir=str(tmp_path / "work"),
            scenarios=scenarios,
            grpo=GrpoSpec(max_steps=30, learning_rate=1e-2, num_generations=4,
                          per_device_train_batch_size=8, max_completion_length=8, beta=0.0,
                          save_steps=30),
            convergence=ConvergenceSpec(min_steps=10_000),
            judges={"grader": JudgeEndpoint(url=server.url, model="tiny")})
        events: list[Any] = []

        async def go() -> Any:
            with anyio.fail_after(300):
                return await run_trainer(spec, on_event=events.append, log_path=tmp_path / "t.log")

        started = time.monotonic()
        outcome = anyio.run(go)
        assert outcome.stopped is not None and outcome.stopped.reason == "completed", time.monotonic() - started
        judged = len(server.requests)
    metrics = [e for e in events if isinstance(e, TrainerMetric)]
    assert any(isinstance(e, TrainerStopped) for e in events)
    rewards = [m.reward_mean for m in metrics if m.reward_mean is not None]
    assert len(rewards) >= 10
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.2  # the judge's "yes" was learned
    assert judged > 0
    assert all(m.judge_failure_share == 0.0 for m in metrics)
