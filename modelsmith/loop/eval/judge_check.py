"""``judge.check``: run a judge on its calibration set and record how far it can be trusted.

For each calibration set (:mod:`modelsmith.loop.eval.judge_calibration`) the job holds the
judge's engine ready (:func:`modelsmith.loop.eval.judges.judge_engines`, as an eval does), asks
it ``repeats`` times per labelled example - all requests at once, the engine's own concurrency
limit applies, and at most :data:`MAX_IN_FLIGHT` are in flight) with the eval's sampling
(``[sampling]`` of the cluster: the judge's temperature), the first verdict at the eval's own
seed and the repeats unseeded. The
first verdicts are compared with the human scores (:func:`judge_stats.agreement`), all K give
the self-consistency figures (:func:`judge_stats.consistency`). Replies are read exactly as the
rubric reads them (:func:`modelsmith.loop.scoring.rubric.parse_judge_reply`): a malformed reply
is a judge failure and is reported as one, never dropped.

Every example's verdicts go to ``<cluster>/judge-checks/<judge>-<job>.json`` (written
atomically) and the figures to the ledger as ``judge.checked`` with the judge's identity; the
cluster state keeps the latest check of each identity, which the promotion gate's
``judge_agreement`` check reads (:func:`judge_gate`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import anyio
import msgspec

from modelsmith.atomic import atomic_write_bytes
from modelsmith.clock import utc_stamp
from modelsmith.daemon.config import NamedEngineConfig, OpenAINamedEngine
from modelsmith.errors import ModelsmithError, ValidationError, error_envelope
from modelsmith.gpu.engine import Engine, Sampling
from modelsmith.gpu.engines import EnginePool
from modelsmith.gpu.named_engines import NamedEngines, vllm_spec_for
from modelsmith.hashing import sha256_hex
from modelsmith.loop.cluster.fleet import ClusterRuntime, Fleet
from modelsmith.loop.eval.answers import eval_sampling
from modelsmith.loop.eval.judge_calibration import (
    CalibrationSet,
    judge_identity,
    load_calibration,
    load_calibrations,
    matches,
)
from modelsmith.loop.eval.judge_stats import agreement, consistency
from modelsmith.loop.eval.judges import judge_engines
from modelsmith.loop.jobs.registry import Job, JobRegistry
from modelsmith.loop.records.events import JudgeChecked
from modelsmith.loop.scoring.rubric import parse_judge_reply
from modelsmith.loop.scoring.scenarios import JUDGE_CLUSTER_ENGINE, Scenario
from modelsmith.rpc.dispatch import MethodTable
from modelsmith.rpc.schema.judges import (
    JudgeCheckParams,
    JudgeCheckResult,
    JudgeCheckStarted,
    JudgeInfo,
    JudgeList,
    JudgeListParams,
)
from modelsmith.rpc.server import CallContext

__all__ = ["CHECKS_DIR", "JudgeService", "engine_models", "judge_checks_as_of", "judge_gate",
           "run_check"]

CHECKS_DIR = "judge-checks"
READY_S = 60.0
MAX_IN_FLIGHT = 16


def engine_models(engines: Mapping[str, NamedEngineConfig], home: Path) -> dict[str, str]:
    """Each named engine's model as a judge identity names it: an OpenAI-compatible engine's
    model name, a vLLM one's resolved model directory."""
    return {name: config.model if isinstance(config, OpenAINamedEngine)
            else str(vllm_spec_for(config, home).model) for name, config in engines.items()}


def engine_model(runtime: ClusterRuntime, name: str, models: Mapping[str, str] | None) -> str | None:
    """The model behind judge engine ``name``; None when it is not known here."""
    if name == JUDGE_CLUSTER_ENGINE:
        engine = runtime.cluster.config.engine
        return engine.model if engine.kind == "openai" and engine.model else str(runtime.cluster.base_model)
    return None if models is None else models.get(name)


def _verdict_scores(replies: list[str | Exception], scale: float) -> list[float | None]:
    scores: list[float | None] = []
    for reply in replies:
        if isinstance(reply, Exception):
            scores.append(None)
            continue
        verdict = parse_judge_reply(reply, scale=scale)
        scores.append(None if verdict.score is None else verdict.score * scale)
    return scores


async def run_check(calibration: CalibrationSet, engine: Engine, sampling: Sampling, *,
                    repeats: int, resamples: int, seed: int, job: Job | None = None
                    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Ask the judge ``repeats`` times per example; (figures, per-example rows)."""
    criterion = calibration.criterion
    examples = calibration.examples
    replies: list[list[str | Exception]] = [[ValueError("not asked")] * repeats for _ in examples]
    done = 0
    # In flight at once: an HTTP engine has its own limit; this bounds what a check puts on an
    # in-process engine (vLLM's CPU build fails seeded requests split across prefill chunks).
    limiter = anyio.CapacityLimiter(MAX_IN_FLIGHT)

    async def ask(row: int, k: int) -> None:
        nonlocal done
        example = examples[row]
        text = criterion.render(prompt=example.prompt, response=example.response,
                                reference=example.reference)
        # The first verdict as the eval asks (its seed); the repeats are unseeded draws at the
        # same temperature, so they can differ as the judge's own sampling does.
        params = sampling if k == 0 else msgspec.structs.replace(sampling, seed=None)
        try:
            async with limiter:
                replies[row][k] = (await engine.generate(text, params)).text
        except Exception as exc:  # an engine's failure is the judge's: reported, not raised
            replies[row][k] = exc
        done += 1
        if job is not None:
            job.set_progress(done, len(examples) * repeats)

    # A template that shows two answers (the reference and the one graded): each example with a
    # reference is also asked with the two swapped, to see whether their places move the score.
    two = shows_two_answers(criterion.template)
    swapped: list[str | Exception | None] = [None] * len(examples)

    async def ask_swapped(row: int) -> None:
        example = examples[row]
        text = criterion.render(prompt=example.prompt, response=example.reference or "",
                                reference=example.response)
        try:
            async with limiter:
                swapped[row] = (await engine.generate(text, sampling)).text
        except Exception as exc:
            swapped[row] = exc

    async with anyio.create_task_group() as tg:
        for row in range(len(examples)):
            for k in range(repeats):
                tg.start_soon(ask, row, k)
            if two and examples[row].reference is not None:
                tg.start_soon(ask_swapped, row)
    scores = [_verdict_scores(r, criterion.scale) for r in replies]
    swapped_scores = [None if r is None else _verdict_scores([r], criterion.scale)[0] for r in swapped]
    first = [s[0] for s in scores]
    figures = agreement([e.human_score for e in examples], first, scale=criterion.scale,
                        pass_mark=calibration.pass_mark, resamples=resamples, seed=seed)
    mean_spread, max_spread, agreeing, failures = consistency(scores)
    rows = []
    for example, verdicts, raw, swap, swap_raw in zip(examples, scores, replies, swapped_scores,
                                                     swapped, strict=True):
        entry: dict[str, Any] = {"id": example.id, "labeller": example.labeller,
                                 "human_score": example.human_score, "judge_scores": verdicts,
                                 "replies": [_shown(r) for r in raw]}
        if swap_raw is not None:
            entry.update(swapped_score=swap, swapped_reply=_shown(swap_raw))
        rows.append(entry)
    pairs = [(s[0], w) for s, w in zip(scores, swapped_scores, strict=True)
             if s[0] is not None and w is not None]
    out = {name: getattr(figures, name) for name in figures.__slots__}
    out.update(consistency_mean_spread=mean_spread, consistency_max_spread=max_spread,
               consistency_agreeing=agreeing, repeat_failures=failures,
               order_bias=round(sum(a - b for a, b in pairs) / len(pairs), 6) if pairs else None,
               order_pairs=len(pairs))
    return out, rows


def shows_two_answers(template: str) -> bool:
    """Does the template show two answers (the reference and the graded one)?"""
    return "{response}" in template and "{reference}" in template


def _shown(reply: str | Exception) -> str:
    return reply if isinstance(reply, str) else f"error: {type(reply).__name__}: {reply}"


def judge_gate(runtime: ClusterRuntime, scenarios: Iterable[Scenario],
               models: Mapping[str, str] | None) -> tuple[bool, str, list[dict[str, Any]]]:
    """The ``judge_agreement`` gate check for an eval over ``scenarios``: (passed, detail, each
    judge's standing). Off (passes) when ``[policy] min_judge_agreement`` is unset."""
    minimum = runtime.cluster.config.policy.min_judge_agreement
    used: dict[tuple[str, str, float], Any] = {}
    for scenario in scenarios:
        for index in scenario.rubric.judge_indices():
            criterion: Any = scenario.rubric.criteria[index]
            key = (criterion.engine, getattr(criterion, "template", ""), getattr(criterion, "scale", 0.0))
            used.setdefault(key, criterion)
    standing = judge_standing(runtime, models)
    if minimum is None:
        return True, f"off ([policy] min_judge_agreement unset); {len(used)} judge(s) used", standing
    if not used:
        return True, "the eval used no judge", standing
    problems, fine = [], []
    for (engine, _, _), criterion in sorted(used.items(), key=lambda item: item[0][0]):
        found = [s for s in standing if s.get("calibration") is not None
                 and matches(criterion, s["calibration"])]
        if not found:
            problems.append(f"{criterion.kind} on {engine!r}: no calibration set in judges/ "
                            "matches its engine, template and scale")
            continue
        best = max(found, key=lambda s: s["check"].kappa if s.get("check") and s["check"].kappa is not None else -2)
        check = best.get("check")
        if check is None:
            problems.append(f"judge {best['judge']!r} ({engine}): no check of the current judge, "
                            "template and calibration set; run `modelsmith judge check`")
        elif check.kappa is None or check.kappa < minimum:
            kappa = "undefined" if check.kappa is None else f"{check.kappa:.3f}"
            problems.append(f"judge {best['judge']!r} ({engine}): kappa {kappa} < {minimum:g}")
        else:
            fine.append(f"judge {best['judge']!r} ({engine}): kappa {check.kappa:.3f} >= {minimum:g}")
    if problems:
        return False, "; ".join(problems + fine), standing
    return True, "; ".join(fine), standing


def judge_standing(runtime: ClusterRuntime, models: Mapping[str, str] | None) -> list[dict[str, Any]]:
    """Each calibration set, its current identity and the latest check of it (or why none)."""
    from modelsmith.loop.eval.judge_calibration import CALIBRATION_DIR, calibration_names

    out: list[dict[str, Any]] = []
    root = runtime.cluster.root
    for name in calibration_names(root):
        entry: dict[str, Any] = {"judge": name, "file": f"{CALIBRATION_DIR}/{name}.yaml"}
        try:
            calibration = load_calibration(root / CALIBRATION_DIR / f"{name}.yaml", cluster_root=root)
        except ModelsmithError as exc:
            entry["error"] = error_envelope(exc)
            out.append(entry)
            continue
        entry["calibration"] = calibration
        model = engine_model(runtime, calibration.criterion.engine, models)
        if model is not None:
            identity = judge_identity(calibration, model)
            entry["identity"] = identity
            entry["check"] = runtime.state.judge_checks.get(identity)
        else:
            entry["check"] = None
            entry["error"] = {"code": 1001, "name": "not_found", "data": {"engine": calibration.criterion.engine},
                              "message": f"engine {calibration.criterion.engine!r} is not configured here"}
        out.append(entry)
    return out


def judge_checks_as_of(entries: Iterable[Any], request_id: str | None) -> list[dict[str, Any]]:
    """The latest ``judge.checked`` of each judge recorded before the promotion request
    ``request_id`` (every one when the ledger has no such request), as JudgeCheckResult
    dicts with their time: what the evidence bundle shows."""
    from modelsmith.loop.records.events import PromotionRequested

    latest: dict[str, dict[str, Any]] = {}
    for recorded in entries:
        event = recorded.event
        if isinstance(event, PromotionRequested) and event.request_id == request_id:
            break
        if isinstance(event, JudgeChecked):
            latest[event.judge] = msgspec.to_builtins(check_result(event, recorded.ts))
    return [latest[name] for name in sorted(latest)]


def check_result(event: JudgeChecked, checked_at: str | None = None) -> JudgeCheckResult:
    data = msgspec.to_builtins(event)
    data.pop("kind", None)
    return msgspec.convert({**data, "checked_at": checked_at}, JudgeCheckResult)


class JudgeService:
    """judge.check (a job) and judge.list."""

    def __init__(self, fleet: Fleet, jobs: JobRegistry, engines: EnginePool, named: NamedEngines,
                 models: Mapping[str, str] | None = None) -> None:
        self.fleet = fleet
        self.jobs = jobs
        self.engines = engines
        self.named = named
        self.models = models
        self.ready_s = READY_S

    def _model(self, runtime: ClusterRuntime, name: str) -> str:
        model = engine_model(runtime, name, self.models)
        if model is None:
            self.named.config(name)  # UnknownEngine, listing the known ones
            raise ValidationError(f"the model of engine {name!r} is not known",
                                  data={"engine": name})
        return model

    def plan(self, params: JudgeCheckParams) -> tuple[ClusterRuntime, list[CalibrationSet]]:
        runtime = self.fleet.get(params.cluster)
        runtime.require_ledger()
        if params.repeats is not None and not 1 <= params.repeats <= 10:
            raise ValidationError("repeats must be 1..10", data={"field": "repeats"})
        calibrations = load_calibrations(runtime.cluster.root, params.judge)
        if not calibrations:
            raise ValidationError(f"cluster {runtime.cluster.name} has no judges/*.yaml "
                                  "calibration set", data={"field": "judge"})
        for calibration in calibrations:
            self._model(runtime, calibration.criterion.engine)
        return runtime, calibrations

    def start(self, params: JudgeCheckParams, runtime: ClusterRuntime,
              calibrations: list[CalibrationSet]) -> Job:
        log_path = runtime.cluster.logs_dir() / "judge-check-{job}.log"

        async def run(job: Job) -> dict[str, Any]:
            return await self._run(job, runtime, calibrations, params)

        job = self.jobs.submit("judge_check", runtime.cluster.name, run)
        job.log_path = str(log_path).replace("{job}", job.job_id)
        return job

    async def _run(self, job: Job, runtime: ClusterRuntime, calibrations: list[CalibrationSet],
                   params: JudgeCheckParams) -> dict[str, Any]:
        sampling = eval_sampling(runtime.cluster)
        cfg = runtime.cluster.config.eval
        names = {c.criterion.engine for c in calibrations}
        results: list[dict[str, Any]] = []
        async with contextlib.AsyncExitStack() as stack:
            held = await stack.enter_async_context(judge_engines(
                self.engines, self.named, runtime.cluster.name, names, ready_s=self.ready_s))
            for calibration in calibrations:
                job.message = f"judge {calibration.name}"
                repeats = params.repeats or calibration.repeats
                figures, rows = await run_check(
                    calibration, held[calibration.criterion.engine], sampling, repeats=repeats,
                    resamples=cfg.bootstrap_resamples, seed=cfg.bootstrap_seed, job=job)
                results.append(await self._record(job, runtime, calibration, repeats, figures, rows))
        return {"judges": results}

    async def _record(self, job: Job, runtime: ClusterRuntime, calibration: CalibrationSet,
                      repeats: int, figures: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
        criterion = calibration.criterion
        model = self._model(runtime, criterion.engine)
        report = f"{CHECKS_DIR}/{calibration.name}-{job.job_id}.json"
        body = {"judge": calibration.name, "engine": criterion.engine, "engine_model": model,
                "template": criterion.template, "template_sha256": calibration.template_sha256,
                "calibration_version": calibration.version, "scale": criterion.scale,
                "pass_mark": calibration.pass_mark, "repeats": repeats, "checked_at": utc_stamp(),
                "figures": figures, "examples": rows}
        data = msgspec.json.format(msgspec.json.encode(body), indent=2) + b"\n"
        path = runtime.cluster.root / report
        await anyio.to_thread.run_sync(lambda: path.parent.mkdir(parents=True, exist_ok=True))
        await anyio.to_thread.run_sync(atomic_write_bytes, path, data)
        event = JudgeChecked(
            judge=calibration.name, job_id=job.job_id, engine=criterion.engine, engine_model=model,
            template_sha256=calibration.template_sha256, calibration_version=calibration.version,
            identity=judge_identity(calibration, model), examples=figures["examples"],
            answered=figures["answered"], repeats=repeats, pass_mark=calibration.pass_mark,
            scale=criterion.scale, exact_rate=figures["exact_rate"],
            within_one_rate=figures["within_one_rate"], kappa=figures["kappa"],
            spearman=figures["spearman"], exact_ci95=figures["exact_ci95"],
            within_one_ci95=figures["within_one_ci95"], kappa_ci95=figures["kappa_ci95"],
            spearman_ci95=figures["spearman_ci95"],
            consistency_mean_spread=figures["consistency_mean_spread"],
            consistency_max_spread=figures["consistency_max_spread"],
            consistency_agreeing=figures["consistency_agreeing"],
            repeat_failures=figures["repeat_failures"], order_bias=figures["order_bias"],
            report=report,
            report_sha256=sha256_hex(data))
        recorded = await anyio.to_thread.run_sync(runtime.record, event)
        result: dict[str, Any] = msgspec.to_builtins(check_result(event, recorded.ts))
        return result

    def judge_list(self, cluster: str) -> JudgeList:
        runtime = self.fleet.get(cluster)
        runtime.require_ledger()
        minimum = runtime.cluster.config.policy.min_judge_agreement
        infos = []
        for entry in judge_standing(runtime, self.models):
            calibration: CalibrationSet | None = entry.get("calibration")
            check: JudgeChecked | None = entry.get("check")
            result = check_result(check) if check is not None else None
            passing = None
            if minimum is not None:
                passing = bool(check is not None and check.kappa is not None and check.kappa >= minimum)
            infos.append(JudgeInfo(
                judge=entry["judge"], file=entry["file"],
                engine=calibration.criterion.engine if calibration else None,
                identity=entry.get("identity"),
                template_sha256=calibration.template_sha256 if calibration else None,
                calibration_version=calibration.version if calibration else None,
                examples=len(calibration.examples) if calibration else 0, check=result,
                min_agreement=minimum, passing=passing, error=entry.get("error")))
        return JudgeList(cluster=cluster, judges=infos)

    def register(self, table: MethodTable) -> None:
        async def judge_check(params: JudgeCheckParams, ctx: CallContext) -> JudgeCheckStarted:
            runtime, calibrations = await anyio.to_thread.run_sync(self.plan, params)
            job = self.start(params, runtime, calibrations)
            return JudgeCheckStarted(job_id=job.job_id, status="started", cluster=params.cluster,
                                     judges=[c.name for c in calibrations], log=job.log_path or "")

        async def judge_list(params: JudgeListParams, ctx: CallContext) -> JudgeList:
            return await anyio.to_thread.run_sync(self.judge_list, params.cluster)

        table.add("judge.check", JudgeCheckParams, judge_check,
                  "Run judges on their calibration sets (judges/*.yaml); returns a job id.")
        table.add("judge.list", JudgeListParams, judge_list,
                  "Calibration sets, their judges' identities and latest checks.")
