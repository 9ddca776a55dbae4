"""Which judges a training job's reward can ask: the ``judges`` of its trainer spec, or a refusal.

An ``llm_judge`` criterion names ``engine``: a ``[engines.NAME]`` of modelsmith.toml, or
``cluster`` (the cluster's own engine). The trainer child asks the judge for every completion's
reward (:mod:`modelsmith.gpu.trainer_reward`), so the judge must be reachable from a separate
process while the trainer holds the device:

- a named ``kind = "openai"`` engine, and ``cluster`` when the cluster's ``[engine]`` is
  ``kind = "openai"``: reachable over HTTP; they become :class:`JudgeEndpoint` entries (URL,
  model, the *name* of the API key's variable, timeouts, concurrency);
- ``cluster`` on an in-process vLLM engine, and a named ``kind = "vllm"`` engine: not reachable
  (the engine lives in the daemon, and on a shared GPU it sleeps while the trainer runs).
  ``train.start`` refuses with :class:`JudgeUnreachable` naming the scenario, the criterion and
  the engine, instead of training on the other criteria only (or on nothing) in silence.
"""

from __future__ import annotations

from collections.abc import Iterable

from modelsmith.daemon.config import OpenAINamedEngine
from modelsmith.errors import ValidationError
from modelsmith.gpu.named_engines import NamedEngines
from modelsmith.gpu.trainer_spec import JudgeEndpoint
from modelsmith.loop.cluster.config import Cluster
from modelsmith.loop.eval.answers import eval_sampling
from modelsmith.loop.scoring.criteria import (
    JUDGE_KINDS,
    LabelCriterion,
    LlmJudgeCriterion,
    RubricJudgeCriterion,
)
from modelsmith.loop.scoring.scenarios import JUDGE_CLUSTER_ENGINE, Scenario

__all__ = ["JudgeUnreachable", "reward_judges"]


class JudgeUnreachable(ValidationError):
    """A training scenario's ``llm_judge`` criterion asks a judge the trainer cannot reach;
    ``data`` has ``scenario``, ``criterion``, ``engine`` and ``field``."""


def _refuse(scenario: Scenario, index: int,
            criterion: LlmJudgeCriterion | LabelCriterion | RubricJudgeCriterion,
            why: str) -> JudgeUnreachable:
    return JudgeUnreachable(
        f"scenario {scenario.id}: criterion {criterion.label!r} is judged by engine "
        f"{criterion.engine!r}, {why}; the GRPO reward must ask the same judge as the eval, so "
        "nothing is trained. Judge it with a kind = \"openai\" engine ([engines.NAME] in "
        "modelsmith.toml, e.g. `vllm serve` of the judge model), or train on scenarios "
        "without this criterion",
        data={"scenario": scenario.id, "criterion": criterion.label, "engine": criterion.engine,
              "field": f"rubric.criteria[{index}].engine"})


def reward_judges(scenarios: Iterable[Scenario], cluster: Cluster,
                  named: NamedEngines) -> dict[str, JudgeEndpoint]:
    """The spec's ``judges`` for these training scenarios; JudgeUnreachable for the first
    criterion whose judge the trainer child cannot ask (UnknownEngine for an unknown name)."""
    sampling = eval_sampling(cluster)
    found: dict[str, JudgeEndpoint] = {}
    for scenario in scenarios:
        for index in scenario.rubric.judge_indices():
            criterion = scenario.rubric.criteria[index]
            assert isinstance(criterion, JUDGE_KINDS)  # llm_judge, label, rubric_judge
            name = criterion.engine
            if name in found:
                continue
            if name == JUDGE_CLUSTER_ENGINE:
                engine = cluster.config.engine
                if engine.kind != "openai" or engine.url is None:
                    raise _refuse(scenario, index, criterion,
                                  "the cluster's in-process vLLM engine, which the trainer "
                                  "process cannot ask (it sleeps while the trainer has the GPU)")
                found[name] = JudgeEndpoint(
                    url=engine.url, model=engine.model or str(cluster.base_model),
                    api_key_env=engine.api_key_env,
                    temperature=sampling.temperature, max_tokens=sampling.max_tokens)
                continue
            config = named.config(name)  # UnknownEngine, listing the known ones
            if not isinstance(config, OpenAINamedEngine):
                raise _refuse(scenario, index, criterion,
                              "an in-process vLLM engine of the daemon, which the trainer "
                              "process cannot ask")
            found[name] = JudgeEndpoint(
                url=config.url, model=config.model, api_key_env=config.api_key_env,
                timeout_s=config.timeout_s,
                # A step's judge batch: a few request bounds, never unbounded.
                batch_timeout_s=config.timeout_s * 3,
                max_concurrency=config.max_concurrency,
                max_retries=min(config.max_retries, 2),
                retry_max_delay_s=min(config.retry_max_delay_s, 10.0),
                temperature=sampling.temperature, max_tokens=sampling.max_tokens)
    return found
