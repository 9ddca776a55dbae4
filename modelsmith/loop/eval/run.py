"""Eval runs: a governed scenario set through a warm engine, scored by its rubrics.

An eval is a job. It appends ``eval.started`` to the cluster ledger, sends every selected
scenario to the engine at once (the engine batches), scores answers in a worker thread in
batches, appends each result to ``evals/<tag>/results.jsonl`` as it arrives, and ends with
``summary.json`` (written atomically) and ``eval.finished`` in the ledger.

With ``repeats`` K > 1 each scenario is sampled K times (trial t with seed ``seed + t``) and
``results.jsonl`` has one line per scenario and trial; the summary folds the trials
(:mod:`modelsmith.loop.eval.aggregate`) and reports pass rates, flaky scenarios and pass^K.

A run interrupted by a crash can be resumed: results already on disk are kept (a torn last line
is cut) and only the missing (scenario, trial) pairs are sent again, so nothing is counted twice.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec
import structlog

from modelsmith.atomic import atomic_write_bytes, fsync_dir
from modelsmith.clock import utc_stamp
from modelsmith.errors import ConflictError, NotFound, ValidationError
from modelsmith.gpu.engine import Completion, Sampling, generate_concurrently
from modelsmith.gpu.named_engines import EnginePrices
from modelsmith.hashing import sha256_file
from modelsmith.loop.cluster.fleet import ClusterRuntime
from modelsmith.loop.eval.aggregate import answer_split, by_scenario, mean_of, trial_stats
from modelsmith.loop.eval.answers import split_reasoning
from modelsmith.loop.eval.measures import measure, with_measures
from modelsmith.loop.eval.stats import bootstrap_ci95
from modelsmith.loop.jobs.registry import Job
from modelsmith.loop.scoring.rubric import CriterionResult, RubricScore, score, score_with_judge
from modelsmith.loop.scoring.scenarios import (
    Scenario,
    prompt_messages,
    prompt_text,
    scenario_hash,
)
from modelsmith.loop.scoring.subsets import quick_subset
from modelsmith.rpc.schema.evals import (
    CriterionOutcome,
    EvalSummary,
    GateResult,
    RegressionReport,
    ScenarioResult,
    ScoreGroup,
)

log = structlog.get_logger("modelsmith.eval")

SCORE_BATCH = 64
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # fullmatch: no trailing newline
_result_decoder = msgspec.json.Decoder(ScenarioResult)
_summary_decoder = msgspec.json.Decoder(EvalSummary)
_encoder = msgspec.json.Encoder()

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"
TRIALS_FILE = "trials.json"  # the run's repeats and temperature, so a resume keeps them


def check_tag(tag: str) -> str:
    if not _TAG.fullmatch(tag):
        raise ValidationError(
            f"eval tag {tag!r} must be 1-128 letters, digits, '.', '_' or '-'", data={"field": "tag"}
        )
    return tag


# -- reading eval artefacts ----------------------------------------------------------------


def eval_dir(runtime: ClusterRuntime, tag: str) -> Path:
    return runtime.cluster.evals_dir() / check_tag(tag)


def read_results(path: Path, *, repair: bool = False) -> list[ScenarioResult]:
    """Read results.jsonl. A torn last line (crash mid-append) is ignored, or cut when ``repair``."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    results: list[ScenarioResult] = []
    good_until = 0
    for line in raw.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            results.append(_result_decoder.decode(line))
        except msgspec.DecodeError:
            break
        good_until += len(line)
    if repair and good_until != len(raw):
        log.warning("cut a torn results line", file=str(path), bytes=len(raw) - good_until)
        with path.open("r+b") as fh:
            fh.truncate(good_until)
            fh.flush()
            os.fsync(fh.fileno())
    return results


class Trials(msgspec.Struct, kw_only=True):
    repeats: int = 1
    temperature: float | None = None


def write_trials(directory: Path, plan: EvalPlan) -> None:
    """Record the plan's trials once (a resumed run keeps the first run's)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / TRIALS_FILE
    if not path.exists():
        atomic_write_bytes(path, _encoder.encode(Trials(repeats=plan.repeats, temperature=plan.temperature)))


def read_trials(directory: Path) -> Trials | None:
    """The trials an earlier run of this eval recorded; None when it recorded none."""
    try:
        return msgspec.json.decode((directory / TRIALS_FILE).read_bytes(), type=Trials)
    except (FileNotFoundError, msgspec.DecodeError):
        return None


def read_summary(runtime: ClusterRuntime, tag: str) -> EvalSummary:
    path = eval_dir(runtime, tag) / SUMMARY_FILE
    try:
        return _summary_decoder.decode(path.read_bytes())
    except FileNotFoundError:
        raise NotFound(
            f"no finished eval {tag!r} in cluster {runtime.cluster.name}",
            data={"cluster": runtime.cluster.name, "tag": tag},
        ) from None


# -- scoring and aggregation ---------------------------------------------------------------


def to_result(s: Scenario, response: str, finish: str | None, tokens: int | None, rs: RubricScore,
              reasoning: str | None = None, trial: int = 0) -> ScenarioResult:
    format_score, substance_score, classes = answer_split(s.rubric, rs)
    return ScenarioResult(
        scenario_id=s.id,
        set=s.set,
        domain=s.domain,
        tags=list(s.tags),
        weight=s.weight,
        scenario_hash=scenario_hash(s),
        prompt=prompt_text(s),
        response=response,
        reference=s.reference,
        score=rs.score,
        passed=rs.passed,
        pass_mark=rs.pass_mark,
        judge_error=rs.judge_error,
        criteria=[
            CriterionOutcome(
                name=c.name, type=c.type, weight=c.weight, score=c.score, passed=c.passed,
                detail=c.detail, error_kind=c.error_kind, counts_as=counts_as,
                reasoning=c.reasoning, parts=c.parts,
            )
            for c, counts_as in zip(rs.criteria, classes, strict=True)
        ],
        finish_reason=finish,
        completion_tokens=tokens,
        reasoning=reasoning,
        trial=trial,
        format_score=format_score,
        substance_score=substance_score,
    )


def weighted_mean(results: Sequence[ScenarioResult]) -> float:
    total = sum(r.weight for r in results)
    return sum(r.score * r.weight for r in results) / total if total else 0.0


def group_scores(results: Sequence[ScenarioResult], key: str) -> dict[str, ScoreGroup]:
    groups: dict[str, list[ScenarioResult]] = {}
    for r in results:
        names = r.tags if key == "tags" else [r.set]
        for name in names:
            groups.setdefault(name, []).append(r)
    return {
        name: ScoreGroup(score=round(weighted_mean(rs), 6), count=len(rs), passed=sum(x.passed for x in rs))
        for name, rs in sorted(groups.items())
    }


def regressions_against(
    current: Sequence[ScenarioResult], baseline: Sequence[ScenarioResult] | None, baseline_tag: str | None
) -> RegressionReport:
    """Scenarios that passed in ``baseline`` and fail in ``current`` (trials folded)."""
    if baseline is None:
        return RegressionReport(baseline_tag=None, compared=0, count=0, scenario_ids=[])
    before = {r.scenario_id: r for r in by_scenario(baseline)}
    compared = [r for r in by_scenario(current) if r.scenario_id in before]
    regressed = sorted(r.scenario_id for r in compared if before[r.scenario_id].passed and not r.passed)
    return RegressionReport(baseline_tag=baseline_tag, compared=len(compared), count=len(regressed), scenario_ids=regressed)


@dataclass(frozen=True, slots=True)
class EvalPlan:
    """Everything an eval run needs, fixed before it starts (and recorded in the ledger)."""

    tag: str
    type: str
    quick: bool
    scenarios: tuple[Scenario, ...]
    scenario_sets: dict[str, str]
    adapter: str | None
    adapter_path: Path | None
    adapter_hash: str | None
    workers: int
    repeats: int = 1
    temperature: float | None = None  # None: the cluster's eval sampling temperature
    engine: str | None = None  # a named engine ([engines.NAME]); None: the cluster's own
    engine_model: str | None = None  # what the named engine serves (its model id or dir)


def select_scenarios(
    all_scenarios: Sequence[Scenario], *, type: str, domain: str | None, quick: bool, quick_size: int
) -> list[Scenario]:
    wanted = {"core": {"core"}, "held_out": {"held-out"}, "full": {"core", "held-out"},
              "synthetic": {"synthetic"}}[type]
    chosen = [s for s in all_scenarios if s.set in wanted and (domain is None or s.domain == domain)]
    if quick:
        chosen = quick_subset(chosen, size=quick_size)
    if not chosen:
        raise ValidationError(
            f"no scenarios match type={type!r} domain={domain!r}", data={"field": "type"}
        )
    return sorted(chosen, key=lambda s: s.id)


def summarize(
    runtime: ClusterRuntime,
    plan: EvalPlan,
    job_id: str,
    results: Sequence[ScenarioResult],
    baseline: tuple[str, list[ScenarioResult]] | None,
    started_at: str,
    duration: float,
    results_sha256: str,
    prices: EnginePrices | None = None,
) -> EvalSummary:
    cfg = runtime.cluster.config
    measures = measure(results, prices)
    trials = trial_stats(results)
    scenarios = by_scenario(results)
    held = [r for r in scenarios if r.set == "held-out"]
    composite = round(weighted_mean(scenarios), 6)
    held_out = round(weighted_mean(held), 6) if held else None
    composite_ci95 = interval_of(runtime, scenarios)
    held_out_ci95 = interval_of(runtime, held)
    regressions = regressions_against(results, baseline[1] if baseline else None, baseline[0] if baseline else None)
    composite_gate = gated_value(cfg.policy.gate_on, composite, composite_ci95)
    held_gate = gated_value(cfg.policy.gate_on, held_out, held_out_ci95)
    gates = {
        "composite": GateResult(value=composite_gate, threshold=cfg.thresholds.composite,
                                passed=composite_gate is not None and composite_gate >= cfg.thresholds.composite,
                                basis=cfg.policy.gate_on),
        "held_out": GateResult(value=held_gate, threshold=cfg.thresholds.held_out,
                               passed=held_gate is not None and held_gate >= cfg.thresholds.held_out,
                               basis=cfg.policy.gate_on),
        "regressions": GateResult(value=float(regressions.count), threshold=float(cfg.policy.max_regressions),
                                  passed=regressions.count <= cfg.policy.max_regressions),
    }
    if plan.type == "core":
        # A core-only run cannot judge the held-out gate; it is reported, not counted.
        gates["held_out"] = GateResult(value=None, threshold=cfg.thresholds.held_out, passed=True,
                                       basis=cfg.policy.gate_on)
    return EvalSummary(
        cluster=runtime.cluster.name,
        tag=plan.tag,
        job_id=job_id,
        type=plan.type,
        quick=plan.quick,
        model=plan.engine_model or runtime.cluster.model_name,
        base_model=plan.engine_model or str(runtime.cluster.base_model),
        iteration=runtime.iteration,
        adapter=plan.adapter,
        adapter_hash=plan.adapter_hash,
        scenario_sets=plan.scenario_sets,
        scenarios=len(plan.scenarios),
        scored=len(scenarios),
        judge_errors=sum(r.judge_error for r in results),
        scoring_errors=scoring_errors(results),
        composite=composite,
        held_out=held_out,
        by_set=group_scores(scenarios, "set"),
        by_tag=group_scores(scenarios, "tags"),
        gates=gates,
        passed=all(g.passed for g in gates.values()),
        regressions=regressions,
        started_at=started_at,
        finished_at=utc_stamp(),
        duration_s=round(duration, 3),
        results_sha256=results_sha256,
        composite_ci95=composite_ci95,
        held_out_ci95=held_out_ci95,
        by_tag_ci95=tag_intervals(runtime, scenarios),
        format_score=mean_of(scenarios, "format_score"),
        substance_score=mean_of(scenarios, "substance_score"),
        repeats=max(plan.repeats, trials.repeats),
        pass_at_k=trials.pass_at_k,
        flaky=trials.flaky,
        pass_rates=trials.pass_rates if max(plan.repeats, trials.repeats) > 1 else {},
        engine=plan.engine,
        latency_p50_s=measures.latency_p50_s,
        latency_p95_s=measures.latency_p95_s,
        tokens_per_s=measures.tokens_per_s,
        cost_per_1k_scenarios_usd=measures.cost_per_1k_scenarios_usd,
    )


def interval_of(runtime: ClusterRuntime, results: Sequence[ScenarioResult]) -> list[float] | None:
    """The 95% bootstrap interval of the weighted mean score of ``results`` (one per scenario)."""
    cfg = runtime.cluster.config.eval
    return bootstrap_ci95([r.score for r in results], [r.weight for r in results],
                          resamples=cfg.bootstrap_resamples, seed=cfg.bootstrap_seed)


def tag_intervals(runtime: ClusterRuntime, results: Sequence[ScenarioResult]) -> dict[str, list[float]]:
    groups: dict[str, list[ScenarioResult]] = {}
    for r in results:
        for name in r.tags:
            groups.setdefault(name, []).append(r)
    out: dict[str, list[float]] = {}
    for name, rs in sorted(groups.items()):
        interval = interval_of(runtime, rs)
        if interval is not None:
            out[name] = interval
    return out


def gated_value(gate_on: str, point: float | None, ci95: list[float] | None) -> float | None:
    """What a score gate compares with its threshold: the point, or (``[policy] gate_on =
    "lower_bound"``) its interval's lower bound; None when that is missing."""
    if gate_on == "lower_bound":
        return ci95[0] if ci95 is not None else None
    return point


class ResultsWriter:
    """Appends result lines durably enough: flushed per batch, fsynced at the end."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fh = path.open("ab")
        fsync_dir(path.parent)

    def write(self, results: Sequence[ScenarioResult]) -> None:
        self._fh.write(b"".join(_encoder.encode(r) + b"\n" for r in results))
        self._fh.flush()

    def close(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()


def scoring_failure(s: Scenario, exc: BaseException) -> RubricScore:
    """The score of a scenario whose scoring raised: its own error, never the eval's."""
    detail = f"scoring failed: {type(exc).__name__}"
    return RubricScore(
        score=0.0, passed=False, pass_mark=s.rubric.pass_mark, scoring_error=True,
        criteria=(CriterionResult(name="scoring", type="scoring", weight=0.0, score=0.0, passed=False,
                                  detail=detail, error_kind="scoring_error"),),
    )


def score_one(s: Scenario, text: str) -> RubricScore:
    """``score()`` of one answer; anything it raises becomes this scenario's ``scoring_error``."""
    try:
        return score(s.rubric, text, s.reference)
    except Exception as exc:
        log.warning("scoring failed", scenario=s.id, error=type(exc).__name__)
        return scoring_failure(s, exc)


def scoring_errors(results: Sequence[ScenarioResult]) -> dict[str, int]:
    """How many results carry each scoring error kind (``scoring_timeout``, ``scoring_error``)."""
    counts: dict[str, int] = {}
    for r in results:
        kinds = {c.error_kind for c in r.criteria if c.error_kind in ("scoring_timeout", "scoring_error")}
        for kind in kinds:
            counts[str(kind)] = counts.get(str(kind), 0) + 1
    return dict(sorted(counts.items()))


Answer = tuple[Scenario, str, str | None, int | None, str | None]
"""A scenario's answer as scored: (scenario, text, finish reason, tokens, reasoning)."""


def read_answer(s: Scenario, completion: Completion, strip_reasoning: bool) -> Answer:
    """The answer to score for ``completion``: its reasoning removed when the cluster says so."""
    text, reasoning = completion.text, completion.reasoning
    if strip_reasoning:
        text, reasoning = split_reasoning(text, reasoning)
    return (s, text, completion.finish_reason, completion.token_count, reasoning)


def score_batch(items: Sequence[Answer | tuple[Scenario, str, str | None, int | None]], trial: int = 0
                ) -> list[ScenarioResult]:
    """Score a batch of answers of one trial (runs in a worker thread); each answer's scoring is
    bounded in time and its failure is its own. An item may leave out the reasoning (None)."""
    out: list[ScenarioResult] = []
    for item in items:
        s, text, finish, tokens = item[0], item[1], item[2], item[3]
        reasoning = item[4] if len(item) > 4 else None
        out.append(to_result(s, text, finish, tokens, score_one(s, text), reasoning, trial))
    return out


def trial_sampling(sampling: Any, plan: EvalPlan, trial: int) -> Any:
    """Trial ``trial``'s sampling: the plan's temperature, and a seed of its own (seed + trial)
    so repeated trials at temperature > 0 are distinct draws yet repeatable."""
    if not isinstance(sampling, Sampling):
        return sampling
    changes: dict[str, Any] = {}
    if plan.temperature is not None:
        changes["temperature"] = plan.temperature
    if trial and sampling.seed is not None:
        changes["seed"] = sampling.seed + trial
    return msgspec.structs.replace(sampling, **changes) if changes else sampling


def has_judge(s: Scenario) -> bool:
    """Whether a criterion of ``s`` asks a judge (msgspec keeps the ``type`` tag off the
    instances: ask the rubric, never ``getattr(c, "type")``)."""
    return bool(s.rubric.judge_indices())


def pending_trials(scenarios: Sequence[Scenario], done: Sequence[ScenarioResult], repeats: int
                   ) -> list[list[Scenario]]:
    """For each trial 0..repeats-1, the scenarios it still has to answer: a resumed run sends
    only the (scenario, trial) pairs with no result on disk."""
    done_keys = {(r.scenario_id, r.trial) for r in done}
    return [[s for s in scenarios if (s.id, trial) not in done_keys] for trial in range(repeats)]


def answers_of(engine: Any, prompts: Sequence[Any], sampling: Any, adapter: str | None,
               limiter: anyio.CapacityLimiter | None) -> AsyncIterator[tuple[int, Completion]]:
    """``(index, completion)`` for every prompt as each finishes: the engine's own batching,
    or (with ``limiter``, the eval's ``workers``) one request per prompt, at most the
    limiter's total in flight."""
    if limiter is None:
        return engine.generate_many(prompts, sampling, adapter=adapter)  # type: ignore[no-any-return]

    async def one(prompt: Any) -> Completion:
        async with limiter:
            return await engine.generate(prompt, sampling, adapter=adapter)  # type: ignore[no-any-return]

    return generate_concurrently(one, prompts)


async def _run_trial(runtime: ClusterRuntime, job: Job, engine: Any, sampling: Any,
                     todo: Sequence[Scenario], trial: int, writer: ResultsWriter,
                     results: list[ScenarioResult], total: int, adapter_name: str | None,
                     judges: Mapping[str, Any] | None = None,
                     limiter: anyio.CapacityLimiter | None = None) -> None:
    """Generate, score and write one trial of ``todo``: plain scenarios batched, judged ones
    one by one (each judge criterion asks the engine its ``engine`` names in ``judges``; a name
    missing there is a judge failure)."""
    held = dict(judges or {})

    def judge_call(judge_engine: Any) -> Callable[[str], Awaitable[str]]:
        async def call(text: str) -> str:
            verdict = await judge_engine.generate(text, sampling)
            return str(verdict.text)
        return call

    judge_fns = {name: judge_call(judge_engine) for name, judge_engine in held.items()}
    plain = [s for s in todo if not has_judge(s)]
    judged = [s for s in todo if has_judge(s)]
    strip = runtime.cluster.config.scoring.strip_reasoning
    pending: list[Answer] = []
    replies: list[Completion] = []

    async def flush() -> None:
        batch, answered = list(pending), list(replies)
        pending.clear()
        replies.clear()
        scored = await anyio.to_thread.run_sync(score_batch, batch, trial)
        scored = [with_measures(r, c) for r, c in zip(scored, answered, strict=True)]
        await anyio.to_thread.run_sync(writer.write, scored)
        results.extend(scored)
        job.set_progress(len(results), total)

    prompts = [prompt_messages(s) for s in plain]
    async for index, completion in answers_of(engine, prompts, sampling, adapter_name, limiter):
        pending.append(read_answer(plain[index], completion, strip))
        replies.append(completion)
        if len(pending) >= SCORE_BATCH:
            await flush()
    if pending:
        await flush()
    for s in judged:
        if limiter is None:
            completion = await engine.generate(prompt_messages(s), sampling, adapter=adapter_name)
        else:
            async with limiter:
                completion = await engine.generate(prompt_messages(s), sampling, adapter=adapter_name)
        _, answer, finish, tokens, reasoning = read_answer(s, completion, strip)
        try:
            rs = await score_with_judge(s.rubric, answer, s.reference, prompt_text=prompt_text(s), judge=judge_fns)
        except Exception as exc:
            log.warning("scoring failed", scenario=s.id, error=type(exc).__name__)
            rs = scoring_failure(s, exc)
        scored = [with_measures(to_result(s, answer, finish, tokens, rs, reasoning, trial), completion)]
        await anyio.to_thread.run_sync(writer.write, scored)
        results.extend(scored)
        job.set_progress(len(results), total)


async def execute_eval(
    runtime: ClusterRuntime,
    plan: EvalPlan,
    job: Job,
    engine: Any,
    sampling: Any,
    *,
    baseline: tuple[str, list[ScenarioResult]] | None,
    adapter_name: str | None = None,
    judges: Mapping[str, Any] | None = None,
    prices: EnginePrices | None = None,
) -> EvalSummary:
    """Run ``plan`` on ``engine``; results stream to disk; returns the summary (also on disk).

    ``plan.workers`` > 0 caps the requests in flight (one CapacityLimiter for the eval); 0 sends
    them all at once. ``judges`` maps the engine names judge criteria use to engines (see
    :mod:`modelsmith.loop.eval.judges`); without them every judge criterion is a judge failure.
    """
    directory = eval_dir(runtime, plan.tag)
    results_path = directory / RESULTS_FILE
    done = await anyio.to_thread.run_sync(lambda: read_results(results_path, repair=True))
    if done:
        job.emit("log", {"message": f"resuming: {len(done)} results already on disk"})
    repeats = max(1, plan.repeats)
    todo = pending_trials(plan.scenarios, done, repeats)
    await anyio.to_thread.run_sync(write_trials, directory, plan)
    temperature = plan.temperature if plan.temperature is not None else getattr(sampling, "temperature", None)
    if repeats > 1 and temperature == 0:
        job.emit("log", {"message": f"{repeats} trials at temperature 0 sample the same answers; "
                                    "give a temperature for distinct draws"})
    started = time.monotonic()
    started_at = utc_stamp()
    total = len(plan.scenarios) * repeats
    job.set_progress(len(done), total, f"evaluating {len(plan.scenarios)} scenarios"
                     + (f" x {repeats} trials" if repeats > 1 else ""))
    writer = await anyio.to_thread.run_sync(ResultsWriter, results_path)
    results: list[ScenarioResult] = list(done)
    limiter = anyio.CapacityLimiter(plan.workers) if plan.workers > 0 else None
    try:
        for trial, scenarios in enumerate(todo):
            if scenarios:
                await _run_trial(runtime, job, engine, trial_sampling(sampling, plan, trial), scenarios,
                                 trial, writer, results, total, adapter_name, judges, limiter)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(writer.close)
    if len({(r.scenario_id, r.trial) for r in results}) != len(results):
        raise ConflictError("an eval counted a scenario twice", data={"tag": plan.tag})
    ordered = sorted(results, key=lambda r: (r.scenario_id, r.trial))
    digest = await anyio.to_thread.run_sync(sha256_file, results_path)
    summary = summarize(runtime, plan, job.job_id, ordered, baseline, started_at, time.monotonic() - started, digest,
                        prices)
    errors = scoring_errors(ordered)
    if errors:
        job.emit("log", {"message": f"scoring errors: {errors}", "scoring_errors": errors})
    await anyio.to_thread.run_sync(
        lambda: atomic_write_bytes(directory / SUMMARY_FILE, msgspec.json.format(_encoder.encode(summary), indent=2))
    )
    return summary
