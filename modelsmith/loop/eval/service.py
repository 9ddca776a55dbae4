"""The eval service: eval.*, scenarios.* methods, and the eval job that runs on a warm engine."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

import anyio

from modelsmith.clock import utc_stamp
from modelsmith.errors import ConflictError, NotFound, ValidationError, error_envelope
from modelsmith.gpu.engine import Engine
from modelsmith.gpu.engines import EnginePool
from modelsmith.gpu.named_engines import NamedEngines
from modelsmith.hashing import sha256_hex
from modelsmith.loop.cluster.fleet import ClusterRuntime, Fleet
from modelsmith.loop.eval.aggregate import by_scenario
from modelsmith.loop.eval.answers import eval_sampling
from modelsmith.loop.eval.judges import hold_named, judge_engine_names, judge_engines
from modelsmith.loop.eval.report import build_report, full_evals
from modelsmith.loop.eval.run import (
    RESULTS_FILE,
    EvalPlan,
    check_tag,
    eval_dir,
    execute_eval,
    read_results,
    read_summary,
    read_trials,
    select_scenarios,
)
from modelsmith.loop.eval.stats import paired_test
from modelsmith.loop.jobs.registry import Job, JobRegistry
from modelsmith.loop.records.events import EvalFailed, EvalFinished, failure_of
from modelsmith.loop.records.events import EvalStarted as EvalStartedEvent
from modelsmith.loop.train.hot_load import require_not_failed
from modelsmith.rpc.dispatch import MethodTable
from modelsmith.rpc.schema.evals import (
    EvalCompareParams,
    EvalComparison,
    EvalList,
    EvalListEntry,
    EvalListParams,
    EvalRef,
    EvalReport,
    EvalReportParams,
    EvalResults,
    EvalResultsParams,
    EvalRunParams,
    EvalStarted,
    EvalSummary,
    PairedTest,
    ScenarioDelta,
    ScenarioResult,
    ScenarioSetInfo,
    ScenarioSets,
    ScenarioSetsParams,
)
from modelsmith.rpc.server import CallContext

_ADAPTER_NAME = re.compile(r"iter-[0-9]{1,9}")
NAMED_READY_S = 60.0


class EvalService:
    def __init__(self, fleet: Fleet, jobs: JobRegistry, engines: EnginePool,
                 named: NamedEngines | None = None) -> None:
        self.fleet = fleet
        self.jobs = jobs
        self.engines = engines
        self.named = named if named is not None else NamedEngines({}, home=Path.cwd())
        # How long an eval on a named engine that the pool does not run (an OpenAI-compatible
        # server) waits for it to answer before the eval fails (EngineError).
        self.named_ready_s = NAMED_READY_S
        # Tags handed out to evals that have not created their directory yet (two quick eval.run
        # calls must not get the same default tag).
        self._planned: set[tuple[str, str]] = set()

    # -- planning ---------------------------------------------------------------------
    def default_tag(self, runtime: ClusterRuntime, type: str, quick: bool,
                    engine: str | None = None) -> str:
        if engine is not None:
            base = f"{runtime.cluster.name}-{engine}-{type.replace('_', '-')}"
        else:
            base = f"{runtime.cluster.name}-iter-{runtime.iteration}-{type.replace('_', '-')}"
        if quick:
            base += "-quick"
        tag, n = base, 1
        while (runtime.cluster.evals_dir() / tag).exists() or (runtime.cluster.name, tag) in self._planned:
            n += 1
            tag = f"{base}-{n}"
        return tag

    def resolve_adapter(self, runtime: ClusterRuntime, requested: str | None) -> str | None:
        if requested in (None, ""):
            return runtime.candidate or runtime.champion
        if requested == "base":
            return None
        if requested == "champion":
            return runtime.champion
        if requested == "candidate":
            if runtime.candidate is None:
                raise NotFound(f"cluster {runtime.cluster.name} has no candidate adapter",
                               data={"field": "adapter"})
            return runtime.candidate
        assert requested is not None
        if not _ADAPTER_NAME.fullmatch(requested):
            raise ValidationError(
                f"adapter {requested!r} is not a name: use iter-N, champion, candidate or base "
                f"(adapters live in {runtime.cluster.root / 'adapters'})",
                data={"field": "adapter", "adapter": requested[:200]})
        path = runtime.adapter_path(requested)
        adapters = (runtime.cluster.root / "adapters").resolve()
        if not path.is_dir() or path.resolve().parent != adapters:
            raise NotFound(f"no adapter {requested!r} in cluster {runtime.cluster.name}",
                           data={"field": "adapter", "adapter": requested})
        return requested

    def plan(self, runtime: ClusterRuntime, params: EvalRunParams, *, resume: bool = False) -> EvalPlan:
        """Fix what an eval will run. ``resume`` re-plans an interrupted eval under its own tag."""
        catalog = runtime.require_catalog()
        scenarios = select_scenarios(
            catalog.all(), type=params.type, domain=params.domain, quick=params.quick,
            quick_size=runtime.cluster.config.eval.quick_size,
        )
        workers = params.workers or 0
        if params.engine is not None:
            if params.adapter not in (None, ""):
                raise ValidationError(
                    f"adapter {params.adapter!r} with engine {params.engine!r}: a named engine "
                    "serves no adapters of the cluster; leave adapter out",
                    data={"field": "adapter", "engine": params.engine})
            self.named.config(params.engine)  # UnknownEngine, listing the known ones
            adapter = None
            workers = params.workers or self.named.max_concurrency(params.engine) or 0
        else:
            adapter = self.resolve_adapter(runtime, params.adapter)
        adapter_path = runtime.adapter_path(adapter) if adapter else None
        adapter_hash = None
        if adapter_path is not None:
            from modelsmith.gpu.adapters import verify_adapter

            adapter_hash = verify_adapter(adapter_path).adapter_sha256
        if params.tag is not None:
            tag = check_tag(params.tag)
            if not resume and (runtime.cluster.evals_dir() / tag).exists():
                raise ConflictError(f"eval tag {tag!r} exists already in {runtime.cluster.name}",
                                    data={"field": "tag", "tag": tag})
        else:
            tag = self.default_tag(runtime, params.type, params.quick, params.engine)
        repeats, temperature = params.repeats, params.temperature
        recorded = read_trials(runtime.cluster.evals_dir() / tag) if resume else None
        if recorded is not None:  # a resumed run samples as its first run did
            repeats, temperature = recorded.repeats, recorded.temperature
        self._planned.add((runtime.cluster.name, tag))
        return EvalPlan(
            tag=tag, type=params.type, quick=params.quick, scenarios=tuple(scenarios),
            scenario_sets=catalog.versions(), adapter=adapter, adapter_path=adapter_path,
            adapter_hash=adapter_hash, workers=workers,
            repeats=repeats, temperature=temperature, engine=params.engine,
            engine_model=self.named.model(params.engine) if params.engine is not None else None,
        )

    def baseline(self, runtime: ClusterRuntime) -> tuple[str, list[Any]] | None:
        """The champion's eval when one was promoted, else the previous eval of the cluster."""
        tag = runtime.state.champion_eval_tag or runtime.last_eval_tag
        if tag is None:
            return None
        return tag, read_results(eval_dir(runtime, tag) / RESULTS_FILE)

    # -- the job ------------------------------------------------------------------------
    def start(
        self, params: EvalRunParams, *, plan: EvalPlan | None = None, resume_job_id: str | None = None
    ) -> tuple[Job, EvalPlan]:
        """Submit the eval job. Must run on the event loop; ``plan`` may be made in a thread."""
        runtime = self.fleet.get(params.cluster)
        runtime.require_ledger()
        if params.engine is None:
            engine = self.engines.engine_for(runtime.cluster.name)
        if plan is None:
            plan = self.plan(runtime, params, resume=resume_job_id is not None)
        if params.engine is not None:
            engine = self.named.get(params.engine)
        log_path = runtime.cluster.logs_dir() / "eval-{job}.log"

        async def run(job: Job) -> dict[str, Any]:
            try:
                return await self._run(job, runtime, engine, plan, params)
            finally:
                self._planned.discard((runtime.cluster.name, plan.tag))

        job = self.jobs.submit("eval", runtime.cluster.name, run, job_id=resume_job_id)
        job.log_path = str(log_path).replace("{job}", job.job_id)
        return job, plan

    async def _run(self, job: Job, runtime: ClusterRuntime, engine: Engine, plan: EvalPlan,
                   params: EvalRunParams) -> dict[str, Any]:
        """The eval job: ledger start, generate + score + write, summary, ledger end."""
        job.message = f"eval {plan.tag}"
        baseline = await anyio.to_thread.run_sync(self.baseline, runtime)
        await anyio.to_thread.run_sync(runtime.record, EvalStartedEvent(
            tag=plan.tag, job_id=job.job_id, type=plan.type, quick=plan.quick,
            scenarios=len(plan.scenarios), scenario_sets=dict(plan.scenario_sets),
            adapter=plan.adapter, adapter_hash=plan.adapter_hash, domain=params.domain,
            log=job.log_path, engine=plan.engine))
        try:
            if plan.engine is not None:
                summary = await self._run_named(job, runtime, engine, plan, baseline)
            else:
                # Waits while the engine loads or sleeps for a trainer (bounded: the pool's
                # wait_awake_s), and keeps it awake until the last answer: no request meets a
                # sleeping engine.
                if self.engines.gate_for(runtime.cluster.name).asleep:
                    job.message = f"eval {plan.tag}: waiting for the engine to wake (a trainer has its GPU)"
                async with self.engines.serving(runtime.cluster.name):
                    job.message = f"eval {plan.tag}"
                    adapter_name = None
                    if plan.adapter is not None and plan.adapter_path is not None:
                        require_not_failed(runtime, plan.adapter)  # its canaries failed: not served
                        adapter_name = await self.engines.ensure_adapter(runtime.cluster.name, plan.adapter, plan.adapter_path)
                    sampling = eval_sampling(runtime.cluster)
                    async with self._judges(runtime, plan) as judges:
                        summary = await execute_eval(runtime, plan, job, engine, sampling, baseline=baseline,
                                                     adapter_name=adapter_name, judges=judges)
            summary_bytes = await anyio.Path(eval_dir(runtime, plan.tag) / "summary.json").read_bytes()
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                failed = EvalFailed(job_id=job.job_id, error=failure_of(exc), tag=plan.tag)
                await anyio.to_thread.run_sync(runtime.record, failed)
            raise
        return await self._finish(job, runtime, plan, summary, summary_bytes)

    async def _finish(self, job: Job, runtime: ClusterRuntime, plan: EvalPlan, summary: EvalSummary,
                      summary_bytes: bytes) -> dict[str, Any]:
        await anyio.to_thread.run_sync(runtime.record, EvalFinished(
            tag=plan.tag, job_id=job.job_id, composite=summary.composite,
            held_out=summary.held_out, passed=summary.passed,
            summary_sha256=sha256_hex(summary_bytes), results_sha256=summary.results_sha256,
            adapter=plan.adapter, engine=plan.engine, type=plan.type))
        out: dict[str, Any] = {"tag": plan.tag, "composite": summary.composite,
                               "held_out": summary.held_out, "passed": summary.passed}
        if plan.engine is not None:
            out["engine"] = plan.engine
        return out

    async def _run_named(self, job: Job, runtime: ClusterRuntime, engine: Engine, plan: EvalPlan,
                         baseline: tuple[str, list[Any]] | None) -> EvalSummary:
        """The governed set on a named engine: held awake through the pool when the pool runs
        it (a vLLM one), else waited for (bounded: ``named_ready_s``; an OpenAI-compatible
        server that does not answer fails the eval, not the daemon); judged by the engines its
        judge criteria name, as any eval of the cluster, so scoring is the same."""
        assert plan.engine is not None
        sampling = eval_sampling(runtime.cluster)
        async with contextlib.AsyncExitStack() as stack:
            engine = await hold_named(stack, self.engines, self.named, plan.engine,
                                      ready_s=self.named_ready_s)
            judges = await stack.enter_async_context(self._judges(runtime, plan))
            return await execute_eval(runtime, plan, job, engine, sampling, baseline=baseline,
                                      judges=judges, prices=self.named.prices(plan.engine))

    def _judges(self, runtime: ClusterRuntime, plan: EvalPlan) -> contextlib.AbstractAsyncContextManager[dict[str, Engine]]:
        """The engines the plan's judge criteria name, held ready for the eval."""
        return judge_engines(self.engines, self.named, runtime.cluster.name,
                             judge_engine_names(plan.scenarios), ready_s=self.named_ready_s)


    # -- RPC ------------------------------------------------------------------------------
    def register(self, table: MethodTable) -> None:
        async def eval_run(params: EvalRunParams, ctx: CallContext) -> EvalStarted:
            runtime = self.fleet.get(params.cluster)
            if params.engine is None:
                self.engines.engine_for(runtime.cluster.name)
            plan = await anyio.to_thread.run_sync(self.plan, runtime, params)
            job, plan = self.start(params, plan=plan)
            return EvalStarted(job_id=job.job_id, status="started", tag=plan.tag, log=job.log_path or "")

        async def eval_summary(params: EvalRef, ctx: CallContext) -> EvalSummary:
            runtime = self.fleet.get(params.cluster)
            return await anyio.to_thread.run_sync(read_summary, runtime, params.tag)

        async def eval_results(params: EvalResultsParams, ctx: CallContext) -> EvalResults:
            runtime = self.fleet.get(params.cluster)
            path = eval_dir(runtime, params.tag) / RESULTS_FILE
            if not path.exists():
                raise NotFound(f"no eval {params.tag!r} in cluster {params.cluster}",
                               data={"tag": params.tag})
            results = await anyio.to_thread.run_sync(read_results, path)
            if params.failed_only:
                results = [r for r in results if not r.passed]
            results.sort(key=lambda r: (r.score, r.scenario_id))
            page = results[params.offset : params.offset + max(1, min(params.limit, 500))]
            return EvalResults(cluster=params.cluster, tag=params.tag, total=len(results),
                               offset=params.offset, results=page)

        async def eval_compare(params: EvalCompareParams, ctx: CallContext) -> EvalComparison:
            runtime = self.fleet.get(params.cluster)
            return await anyio.to_thread.run_sync(compare_evals, runtime, params.a, params.b)

        async def eval_list(params: EvalListParams, ctx: CallContext) -> EvalList:
            runtime = self.fleet.get(params.cluster)
            ledger = runtime.require_ledger()
            entries = [
                EvalListEntry(tag=r.event.tag, composite=r.event.composite,
                              held_out=r.event.held_out, passed=r.event.passed,
                              finished_at=r.ts, adapter=r.event.adapter, engine=r.event.engine)
                for r in ledger.find(EvalFinished)
            ]
            return EvalList(cluster=params.cluster, evals=entries)

        async def eval_report(params: EvalReportParams, ctx: CallContext) -> EvalReport:
            runtime = self.fleet.get(params.cluster)
            return await anyio.to_thread.run_sync(self.report, runtime, params.engines)

        async def scenarios_list(params: ScenarioSetsParams, ctx: CallContext) -> ScenarioSets:
            return await anyio.to_thread.run_sync(self.scenario_sets, params.cluster, False)

        async def scenarios_verify(params: ScenarioSetsParams, ctx: CallContext) -> ScenarioSets:
            return await anyio.to_thread.run_sync(self.scenario_sets, params.cluster, True)

        table.add("eval.run", EvalRunParams, eval_run, "Start an eval job; returns its id at once.")
        table.add("eval.summary", EvalRef, eval_summary, "The summary of a finished eval.")
        table.add("eval.results", EvalResultsParams, eval_results, "Per-scenario results (failed by default).")
        table.add("eval.compare", EvalCompareParams, eval_compare, "Fixed / regressed / unchanged between two evals.")
        table.add("eval.list", EvalListParams, eval_list, "Finished evals of a cluster, from its ledger.")
        table.add("eval.report", EvalReportParams, eval_report,
                  "The receipts: base, champion, candidate and named engines on the current sets, ranked.")
        table.add("scenarios.list", ScenarioSetsParams, scenarios_list, "Governed sets, versions and counts.")
        table.add("scenarios.verify", ScenarioSetsParams, scenarios_verify,
                  "Re-read the scenario files; a changed set becomes a new version in the ledger.")

    def report(self, runtime: ClusterRuntime, engines: list[str] | None) -> EvalReport:
        """:func:`~modelsmith.loop.eval.report.build_report` for the cluster's state now: every
        configured named engine and every one with an eval in the ledger, or ``engines``."""
        entries = runtime.require_ledger().recorded()
        seen = sorted({e.engine for e in full_evals(entries) if e.engine is not None})
        known = list(dict.fromkeys([*self.named.names(), *seen]))
        if engines is None:
            engines = known
        for name in engines:
            if name not in known:
                raise NotFound(f"no engine {name!r} in the config or the ledger of "
                               f"{runtime.cluster.name} (known: {', '.join(known) or 'none'})",
                               data={"engine": name, "known": known})
        state = runtime.state
        return build_report(runtime.cluster.name, runtime.cluster.evals_dir(), entries,
                            versions=dict(state.scenario_versions), champion=state.champion,
                            candidate=state.candidate, engines=list(dict.fromkeys(engines)),
                            generated_at=utc_stamp())

    def scenario_sets(self, cluster: str, reload: bool) -> ScenarioSets:
        from modelsmith.errors import ModelsmithError

        runtime = self.fleet.get(cluster)
        runtime.require_ledger()
        changed: list[str] = []
        error = None
        if reload:
            try:
                runtime.read_catalog()
            except ModelsmithError as exc:
                error = error_envelope(exc)
            else:
                changed = runtime.reload_scenarios()
        if error is not None and runtime.catalog is None:  # nothing loaded yet: say why
            return ScenarioSets(cluster=cluster, ok=False, sets=[], changed=[], error=error)
        catalog = runtime.require_catalog()
        recorded_versions = dict(runtime.state.scenario_versions)
        sets = [
            ScenarioSetInfo(name=name, version=s.version, count=len(s.scenarios),
                            files=[str(f) for f in s.files], recorded_version=recorded_versions.get(name))
            for name, s in sorted(catalog.sets.items())
        ]
        return ScenarioSets(cluster=cluster, ok=error is None, sets=sets, changed=changed, error=error)


def compare_evals(runtime: ClusterRuntime, a: str, b: str) -> EvalComparison:
    """Eval ``b`` against eval ``a``, scenario by scenario (trials folded), with the exact paired
    tests of :mod:`modelsmith.loop.eval.stats` and the format and substance deltas."""
    sa, sb = read_summary(runtime, a), read_summary(runtime, b)
    ra = {r.scenario_id: r for r in by_scenario(read_results(eval_dir(runtime, a) / RESULTS_FILE))}
    rb = {r.scenario_id: r for r in by_scenario(read_results(eval_dir(runtime, b) / RESULTS_FILE))}
    deltas: list[ScenarioDelta] = []
    for sid in sorted(set(ra) & set(rb)):
        x, y = ra[sid], rb[sid]
        if not x.passed and y.passed:
            status = "fixed"
        elif x.passed and not y.passed:
            status = "regressed"
        else:
            status = "unchanged_pass" if y.passed else "unchanged_fail"
        deltas.append(ScenarioDelta(scenario_id=sid, set=y.set, status=status,  # type: ignore[arg-type]
                                    score_a=x.score, score_b=y.score, delta=round(y.score - x.score, 6)))
    return EvalComparison(
        cluster=runtime.cluster.name, a=a, b=b,
        composite_a=sa.composite, composite_b=sb.composite,
        composite_delta=round(sb.composite - sa.composite, 6),
        held_out_a=sa.held_out, held_out_b=sb.held_out,
        fixed=sum(d.status == "fixed" for d in deltas),
        regressed=sum(d.status == "regressed" for d in deltas),
        unchanged=sum(d.status.startswith("unchanged") for d in deltas),
        only_in_a=sorted(set(ra) - set(rb)), only_in_b=sorted(set(rb) - set(ra)),
        scenarios=deltas,
        paired=paired_between(runtime, ra, rb),
        composite_ci95_a=sa.composite_ci95, composite_ci95_b=sb.composite_ci95,
        format_a=sa.format_score, format_b=sb.format_score,
        format_delta=_delta(sa.format_score, sb.format_score),
        substance_a=sa.substance_score, substance_b=sb.substance_score,
        substance_delta=_delta(sa.substance_score, sb.substance_score),
    )


def _delta(a: float | None, b: float | None) -> float | None:
    return round(b - a, 6) if a is not None and b is not None else None


def paired_between(runtime: ClusterRuntime, a: dict[str, ScenarioResult], b: dict[str, ScenarioResult]
                   ) -> PairedTest | None:
    """The paired test of ``b`` against ``a`` (one folded result per scenario id) on the scenarios
    both ran, weighted by ``b``'s weights; None when they share none."""
    common = sorted(set(a) & set(b))
    if not common:
        return None
    cfg = runtime.cluster.config.eval
    pairs = [(a[sid].score, a[sid].passed, b[sid].score, b[sid].passed, b[sid].weight) for sid in common]
    return paired_test(pairs, resamples=cfg.bootstrap_resamples, seed=cfg.bootstrap_seed)
