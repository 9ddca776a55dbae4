"""The GRPO reward in the trainer child: the scenario's rubric, its ``llm_judge`` criteria asked.

What is graded is what is trained: a completion's reward is :func:`rubric.score` of it, with a
verdict for every ``llm_judge`` criterion from the very judge the eval asks (the criterion's
``engine``). The daemon refuses a training job whose judge the child cannot reach (the
cluster's in-process engine, a vLLM named engine: see
:mod:`modelsmith.loop.train.reward_judges`), so a judge criterion is never silently scored as a
failure for a whole job. The judges that can be reached are OpenAI-compatible HTTP servers,
described by :class:`~modelsmith.gpu.trainer_spec.JudgeEndpoint` in the job spec.

Resources and their handling: :class:`JudgeClients` runs one
:class:`~modelsmith.gpu.openai_engine.OpenAIEngine` per judge (retries, Retry-After, the
per-engine concurrency limit, the API key read from its variable at each request) on an event
loop in a background thread (an anyio blocking portal), started before the first step and
stopped, shielded and bounded, by :meth:`JudgeClients.close`. One generation batch's judge
requests go out together (:meth:`RewardScorer.score_many`), each completion scored by
:func:`~modelsmith.loop.scoring.rubric.score_with_judge`, the eval's own function, so every judge
kind's reply is read exactly as the eval reads it. Each judge's share of the batch is bounded by
its ``batch_timeout_s``; a request still unanswered then is a judge failure for that completion
(the rubric leaves the criterion out of the mean, as in an eval). Replies are cached by (judge,
rendered judge prompt) - the prompt holds the completion, the reference and the template - so a
completion drawn twice is judged once (a malformed reply too: the judge said it); a call that
failed (transport, timeout) is not cached.

Judge failures are counted per reward: :meth:`RewardScorer.take_judge_failure_share` is what the
``metric`` event reports as ``judge_failure_share``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from modelsmith.errors import EngineError, ValidationError
from modelsmith.gpu.trainer_control import StopState
from modelsmith.gpu.trainer_spec import JudgeEndpoint

__all__ = [
    "JudgeClients",
    "RewardScorer",
    "check_judges",
    "make_reward_function",
]

# Successful verdicts kept per job; past this the cache starts over (memory stays bounded).
CACHE_LIMIT = 100_000
READY_TIMEOUT_S = 60.0


def check_judges(scenarios: Sequence[Any], judges: Mapping[str, JudgeEndpoint]) -> None:
    """Every ``llm_judge`` criterion of the spec's scenarios names a judge of the spec; raises
    ValidationError (the child's ``bad_spec``) naming the scenario and criterion otherwise."""
    for position, scenario in enumerate(scenarios):
        for index in scenario.rubric.judge_indices():
            criterion = scenario.rubric.criteria[index]
            if criterion.engine not in judges:
                raise ValidationError(
                    f"scenario {scenario.id}: criterion {criterion.label!r} asks judge "
                    f"{criterion.engine!r}, which the job spec does not describe",
                    data={"field": f"scenarios[{position}].rubric.criteria[{index}].engine",
                          "scenario": scenario.id, "criterion": criterion.label,
                          "engine": criterion.engine})


class JudgeClients:
    """The spec's judges as running HTTP engines, callable from the (synchronous) trainer."""

    def __init__(self, judges: Mapping[str, JudgeEndpoint]) -> None:
        self.judges = dict(judges)
        self._portal_cm: AbstractContextManager[Any] | None = None
        self._portal: Any = None
        self._engines: dict[str, Any] = {}
        self._runs: list[Future[Any]] = []
        # Judge replies by (judge, prompt text): the text holds the completion, the reference
        # and the template, so the same completion is judged once per job.
        self.cache: dict[str, str] = {}
        self.calls = 0
        self.cache_hits = 0

    def start(self, ready_timeout_s: float = READY_TIMEOUT_S) -> None:
        """Run every judge's engine and wait until each answers (EngineError if one does not
        within ``min(ready_timeout_s, its timeout_s)``: training on a dead judge is refused)."""
        if not self.judges or self._portal is not None:
            return
        from anyio.from_thread import start_blocking_portal

        from modelsmith.gpu.openai_engine import OpenAIEngine

        self._portal_cm = start_blocking_portal()
        self._portal = self._portal_cm.__enter__()
        for name, judge in sorted(self.judges.items()):
            engine = OpenAIEngine(
                f"judge {name}", judge.url, judge.model, api_key_env=judge.api_key_env,
                concurrency=judge.max_concurrency, request_timeout=judge.timeout_s,
                max_retries=judge.max_retries, retry_max_delay=judge.retry_max_delay_s,
                health_interval=30.0,
            )
            self._engines[name] = engine
            self._runs.append(self._portal.start_task_soon(engine.run))
        for name, engine in self._engines.items():
            self._portal.call(engine.wait_ready, min(ready_timeout_s, self.judges[name].timeout_s))

    def score_batch(self, items: Sequence[tuple[Any, str, str | None, str]]) -> list[Any]:
        """Each (rubric, response, reference, prompt text) scored by :func:`score_with_judge`
        (the eval's own function), all at once; a list of ``RubricScore``."""
        if not items:
            return []
        if self._portal is None:
            raise EngineError("the judges are not running", data={"reason": "not_started"})
        result: list[Any] = self._portal.call(self._score_batch, list(items))
        return result

    async def _score_batch(self, items: list[tuple[Any, str, str | None, str]]) -> list[Any]:
        import anyio

        from modelsmith.loop.scoring.rubric import score_with_judge

        results: list[Any] = [None] * len(items)
        started = anyio.current_time()
        locks: dict[str, anyio.Lock] = {}

        def call_for(name: str) -> Any:
            async def call(text: str) -> str:
                return await self._ask(name, text, started, locks)
            return call

        calls = {name: call_for(name) for name in self.judges}

        async def one(row: int, rubric: Any, response: str, reference: str | None,
                      prompt: str) -> None:
            results[row] = await score_with_judge(rubric, response, reference, prompt_text=prompt,
                                                  judge=calls)

        async with anyio.create_task_group() as tg:
            for row, item in enumerate(items):
                tg.start_soon(one, row, *item)
        return results

    async def _ask(self, name: str, text: str, started: float, locks: dict[str, Any]) -> str:
        """One judge reply: from the cache, or asked (once per batch for the same text) within
        what is left of the judge's batch bound; raises on failure (a judge failure)."""
        import anyio

        from modelsmith.gpu.engine import Sampling

        key = hashlib.sha256(f"{name}\0{text}".encode()).hexdigest()
        async with locks.setdefault(key, anyio.Lock()):
            cached = self.cache.get(key)
            if cached is not None:
                self.cache_hits += 1
                return cached
            judge = self.judges[name]
            left = started + judge.batch_timeout_s - anyio.current_time()
            if left <= 0:
                raise TimeoutError(f"no verdict within the batch bound of {judge.batch_timeout_s:g} s")
            sampling = Sampling(temperature=judge.temperature, max_tokens=judge.max_tokens)
            try:
                with anyio.fail_after(left):
                    reply: str = (await self._engines[name].generate(text, sampling)).text
            except TimeoutError:
                raise TimeoutError(
                    f"no verdict within the batch bound of {judge.batch_timeout_s:g} s") from None
            self.calls += 1
            if len(self.cache) >= CACHE_LIMIT:
                self.cache.clear()
            self.cache[key] = reply
            return reply

    def close(self) -> None:
        """Stop the engines (each closes its client, shielded and bounded) and the loop."""
        for run in self._runs:
            run.cancel()
        self._runs.clear()
        cm, self._portal_cm, self._portal = self._portal_cm, None, None
        if cm is not None:
            cm.__exit__(None, None, None)
        self._engines.clear()


@dataclass
class _Counts:
    rewards: int = 0
    judge_failures: int = 0


class RewardScorer:
    """Rubric rewards for (rendered prompt, completion) pairs, judges asked in one batch."""

    def __init__(self, prompts: Sequence[str], scenarios: Sequence[Any],
                 judges: JudgeClients | None = None) -> None:
        self.by_prompt: dict[str, Any] = {}
        for text, scenario in zip(prompts, scenarios, strict=True):
            self.by_prompt.setdefault(text, scenario)  # identical prompts: the first rubric decides
        self.by_id = {scenario.id: scenario for scenario in scenarios}
        self.judges = judges
        self.has_judges = any(s.rubric.judge_indices() for s in scenarios)
        self.counts = _Counts()

    def score_one(self, prompt: str, completion: str) -> float:
        return self.score_many([prompt], [completion])[0]

    def score_many(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """The reward of each completion of its prompt's scenario."""
        return self.score_scenarios([self.by_prompt[p] for p in prompts], completions)

    def score_ids(self, scenario_ids: Sequence[str], completions: Sequence[str]) -> list[float]:
        return self.score_scenarios([self.by_id[sid] for sid in scenario_ids], completions)

    def score_scenarios(self, scenarios: Sequence[Any], completions: Sequence[str]) -> list[float]:
        from modelsmith.loop.scoring.rubric import score
        from modelsmith.loop.scoring.scenarios import prompt_text

        judged = [row for row, s in enumerate(scenarios) if s.rubric.judge_indices()]
        results: list[Any] = [None] * len(scenarios)
        if judged and self.judges is not None:
            batch = self.judges.score_batch(
                [(scenarios[row].rubric, completions[row], scenarios[row].reference,
                  prompt_text(scenarios[row])) for row in judged])
            for row, result in zip(judged, batch, strict=True):
                results[row] = result
        rewards = []
        for row, (scenario, text) in enumerate(zip(scenarios, completions, strict=True)):
            result = results[row]
            if result is None:  # no judge criterion (or no judges here: those are failures)
                result = score(scenario.rubric, text, scenario.reference)
            self.counts.rewards += 1
            self.counts.judge_failures += int(result.judge_error)
            rewards.append(float(result.score))
        return rewards

    def take_judge_failure_share(self) -> float | None:
        """Share of the rewards since the last call that had a judge failure (None: no reward,
        or no judge in this job's rubrics); the counts start over."""
        counts, self.counts = self.counts, _Counts()
        if not self.has_judges or counts.rewards == 0:
            return None
        return counts.judge_failures / counts.rewards


def make_reward_function(scorer: RewardScorer, stop: StopState) -> Any:
    """The rubric as a TRL reward function; the dataset's ``scenario_id`` column picks the rubric."""

    def rubric_reward(
        completions: list[Any],
        scenario_id: list[str],
        rubric_rewards: list[float] | None = None,
        **_: Any,
    ) -> list[float | None]:
        if rubric_rewards is not None:
            # Scored already by the rollout sampler (the same rubric on the same text).
            values = [float(value) for value in rubric_rewards]
        else:
            texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
            values = scorer.score_ids(scenario_id, texts)
        rewards: list[float | None] = []
        for value, sid in zip(values, scenario_id, strict=True):
            if not math.isfinite(value):
                # TRL averages NaN rewards away; we must notice them ourselves.
                stop.non_finite_reward = f"reward {value} for scenario {sid}"
            rewards.append(value)
        return rewards

    rubric_reward.__name__ = "rubric"
    return rubric_reward
