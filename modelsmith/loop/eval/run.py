"""Eval runs: a governed scenario set through a warm engine, scored by its rubrics.

An eval is a job. It appends ``eval.started`` to the cluster ledger, sends every selected
scenario to the engine at once (the engine batches), scores answers in a worker thread in
batches, appends each result to ``evals/<tag>/results.jsonl`` as it arrives, and ends with
``summary.json`` (written atomically) and ``eval.finished`` in the ledger.

A run interrupted by a crash can be resumed: results already on disk are kept (a torn last line
is cut) and only the missing scenarios are sent again, so no scenario is counted twice.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec
import structlog

from modelsmith.atomic import atomic_write_bytes, fsync_dir
from modelsmith.clock import utc_stamp
from modelsmith.errors import ConflictError, NotFound, ValidationError
from modelsmith.gpu.engine import Completion, Sampling
from modelsmith.gpu.model_identity import generation_defaults
from modelsmith.hashing import sha256_file
from modelsmith.loop.cluster.config import Cluster
from modelsmith.loop.cluster.fleet import ClusterRuntime
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
              reasoning: str | None = None) -> ScenarioResult:
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
                detail=c.detail, error_kind=c.error_kind,
            )
            for c in rs.criteria
        ],
        finish_reason=finish,
        completion_tokens=tokens,
        reasoning=reasoning,
    )


# -- reading answers: sampling and reasoning ---------------------------------------------------

_THINK_OPEN = "<think>"
_THINK_CLOSE = "</think>"
_DEFAULT_TEMPERATURE = 0.0
_DEFAULT_TOP_P = 1.0
_DEFAULT_MAX_TOKENS = 64


def eval_sampling(cluster: Cluster) -> Sampling:
    """The eval's sampling: cluster.toml first, then the model's generation_config.json, then
    the built-in defaults (greedy, top_p 1, 64 tokens); with the cluster's stop strings and
    chat template variables."""
    cfg = cluster.config.sampling
    model = generation_defaults(cluster.base_model)
    temperature = cfg.temperature if cfg.temperature is not None else model.temperature
    top_p = cfg.top_p if cfg.top_p is not None else model.top_p
    max_tokens = cfg.max_tokens if cfg.max_tokens is not None else model.max_new_tokens
    return Sampling(
        temperature=_DEFAULT_TEMPERATURE if temperature is None else temperature,
        top_p=_DEFAULT_TOP_P if top_p is None else top_p,
        max_tokens=_DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
        seed=cfg.seed,
        stop=list(cfg.stop),
        chat_template_kwargs=dict(cluster.config.model.chat_template_kwargs),
    )


def split_reasoning(text: str, reasoning: str | None = None) -> tuple[str, str | None]:
    """``(answer, reasoning)`` of a completion, as ``[scoring] strip_reasoning`` reads it.

    The rule (docs/scenarios.md): every ``<think>...</think>`` block is reasoning; a
    ``</think>`` with no ``<think>`` before it closes reasoning that began in the prompt (chat
    templates that open the block themselves), so all text before it is reasoning; an
    unterminated ``<think>`` (the answer ran out of tokens while thinking) makes the rest
    reasoning and leaves no answer. A server's separate ``reasoning_content`` is kept as well.
    Whitespace around the answer is trimmed. No reasoning found: ``(text, reasoning)``.
    """
    parts: list[str] = [reasoning] if reasoning else []
    answer: list[str] = []
    rest = text
    first_close = rest.find(_THINK_CLOSE)
    first_open = rest.find(_THINK_OPEN)
    if first_close != -1 and (first_open == -1 or first_close < first_open):
        parts.append(rest[:first_close])
        rest = rest[first_close + len(_THINK_CLOSE):]
    while True:
        start = rest.find(_THINK_OPEN)
        if start == -1:
            answer.append(rest)
            break
        answer.append(rest[:start])
        end = rest.find(_THINK_CLOSE, start + len(_THINK_OPEN))
        if end == -1:
            parts.append(rest[start + len(_THINK_OPEN):])
            break
        parts.append(rest[start + len(_THINK_OPEN):end])
        rest = rest[end + len(_THINK_CLOSE):]
    if len(parts) == (1 if reasoning else 0) and len(answer) == 1:
        return text, reasoning
    return "".join(answer).strip(), "\n".join(p.strip() for p in parts)


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
    if baseline is None:
        return RegressionReport(baseline_tag=None, compared=0, count=0, scenario_ids=[])
    before = {r.scenario_id: r for r in baseline}
    compared = [r for r in current if r.scenario_id in before]
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


def select_scenarios(
    all_scenarios: Sequence[Scenario], *, type: str, domain: str | None, quick: bool, quick_size: int
) -> list[Scenario]:
    wanted = {"core": {"core"}, "held_out": {"held-out"}, "full": {"core", "held-out"}}[type]
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
) -> EvalSummary:
    cfg = runtime.cluster.config
    held = [r for r in results if r.set == "held-out"]
    composite = round(weighted_mean(results), 6)
    held_out = round(weighted_mean(held), 6) if held else None
    regressions = regressions_against(results, baseline[1] if baseline else None, baseline[0] if baseline else None)
    gates = {
        "composite": GateResult(value=composite, threshold=cfg.thresholds.composite,
                                passed=composite >= cfg.thresholds.composite),
        "held_out": GateResult(value=held_out, threshold=cfg.thresholds.held_out,
                               passed=held_out is not None and held_out >= cfg.thresholds.held_out),
        "regressions": GateResult(value=float(regressions.count), threshold=float(cfg.policy.max_regressions),
                                  passed=regressions.count <= cfg.policy.max_regressions),
    }
    if plan.type == "core":
        # A core-only run cannot judge the held-out gate; it is reported, not counted.
        gates["held_out"] = GateResult(value=None, threshold=cfg.thresholds.held_out, passed=True)
    return EvalSummary(
        cluster=runtime.cluster.name,
        tag=plan.tag,
        job_id=job_id,
        type=plan.type,
        quick=plan.quick,
        model=runtime.cluster.model_name,
        base_model=str(runtime.cluster.base_model),
        iteration=runtime.iteration,
        adapter=plan.adapter,
        adapter_hash=plan.adapter_hash,
        scenario_sets=plan.scenario_sets,
        scenarios=len(plan.scenarios),
        scored=len(results),
        judge_errors=sum(r.judge_error for r in results),
        scoring_errors=scoring_errors(results),
        composite=composite,
        held_out=held_out,
        by_set=group_scores(results, "set"),
        by_tag=group_scores(results, "tags"),
        gates=gates,
        passed=all(g.passed for g in gates.values()),
        regressions=regressions,
        started_at=started_at,
        finished_at=utc_stamp(),
        duration_s=round(duration, 3),
        results_sha256=results_sha256,
    )


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


def score_batch(items: Sequence[Answer | tuple[Scenario, str, str | None, int | None]]
                ) -> list[ScenarioResult]:
    """Score a batch of answers (runs in a worker thread); each answer's scoring is bounded in
    time and its failure is its own. An item may leave out the reasoning (None)."""
    out: list[ScenarioResult] = []
    for item in items:
        s, text, finish, tokens = item[0], item[1], item[2], item[3]
        reasoning = item[4] if len(item) > 4 else None
        out.append(to_result(s, text, finish, tokens, score_one(s, text), reasoning))
    return out


def has_judge(s: Scenario) -> bool:
    return any(getattr(c, "type", None) == "llm_judge" for c in s.rubric.criteria)


async def execute_eval(
    runtime: ClusterRuntime,
    plan: EvalPlan,
    job: Job,
    engine: Any,
    sampling: Any,
    *,
    baseline: tuple[str, list[ScenarioResult]] | None,
    adapter_name: str | None = None,
) -> EvalSummary:
    """Run ``plan`` on ``engine``; results stream to disk; returns the summary (also on disk)."""
    directory = eval_dir(runtime, plan.tag)
    results_path = directory / RESULTS_FILE
    done = await anyio.to_thread.run_sync(lambda: read_results(results_path, repair=True))
    done_ids = {r.scenario_id for r in done}
    if done:
        job.emit("log", {"message": f"resuming: {len(done)} results already on disk"})
    todo = [s for s in plan.scenarios if s.id not in done_ids]
    started = time.monotonic()
    started_at = utc_stamp()
    total = len(plan.scenarios)
    job.set_progress(len(done), total, f"evaluating {total} scenarios")
    writer = await anyio.to_thread.run_sync(ResultsWriter, results_path)
    results: list[ScenarioResult] = list(done)
    try:
        plain = [s for s in todo if not has_judge(s)]
        judged = [s for s in todo if has_judge(s)]
        strip = runtime.cluster.config.scoring.strip_reasoning
        pending: list[Answer] = []

        async def flush() -> None:
            batch = list(pending)
            pending.clear()
            scored = await anyio.to_thread.run_sync(score_batch, batch)
            await anyio.to_thread.run_sync(writer.write, scored)
            results.extend(scored)
            job.set_progress(len(results), total)

        prompts = [prompt_messages(s) for s in plain]
        async for index, completion in engine.generate_many(prompts, sampling, adapter=adapter_name):
            pending.append(read_answer(plain[index], completion, strip))
            if len(pending) >= SCORE_BATCH:
                await flush()
        if pending:
            await flush()
        for s in judged:
            completion = await engine.generate(prompt_messages(s), sampling, adapter=adapter_name)
            _, answer, finish, tokens, reasoning = read_answer(s, completion, strip)

            async def judge_fn(text: str) -> str:
                verdict = await engine.generate(text, sampling)
                return str(verdict.text)

            try:
                rs = await score_with_judge(s.rubric, answer, s.reference, prompt_text=prompt_text(s), judge=judge_fn)
            except Exception as exc:
                log.warning("scoring failed", scenario=s.id, error=type(exc).__name__)
                rs = scoring_failure(s, exc)
            scored = [to_result(s, answer, finish, tokens, rs, reasoning)]
            await anyio.to_thread.run_sync(writer.write, scored)
            results.extend(scored)
            job.set_progress(len(results), total)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(writer.close)
    if len({r.scenario_id for r in results}) != len(results):
        raise ConflictError("an eval counted a scenario twice", data={"tag": plan.tag})
    ordered = sorted(results, key=lambda r: r.scenario_id)
    digest = await anyio.to_thread.run_sync(sha256_file, results_path)
    summary = summarize(runtime, plan, job.job_id, ordered, baseline, started_at, time.monotonic() - started, digest)
    errors = scoring_errors(ordered)
    if errors:
        job.emit("log", {"message": f"scoring errors: {errors}", "scoring_errors": errors})
    await anyio.to_thread.run_sync(
        lambda: atomic_write_bytes(directory / SUMMARY_FILE, msgspec.json.format(_encoder.encode(summary), indent=2))
    )
    return summary
