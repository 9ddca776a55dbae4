"""synth.run (a job), synth.list and scenarios.accept.

The job: diagnose the eval, take each chosen failure pattern's core scenarios as sources, ask
the teacher (a named engine) or the cluster's generator for candidates, verify them
(:mod:`~modelsmith.loop.synth.verify`), write the kept ones to ``scenarios/synthetic/``
(:mod:`~modelsmith.loop.synth.governance`), reload the sets (a new synthetic version is a
``scenarios.changed`` entry) and append ``synth.finished`` with every count; a failure appends
``synth.failed``. A synthetic scenario is never held-out and never in an eval's composite; only
``scenarios.accept`` (a reviewer's SSH signature, checked as approvals are) moves it into core.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import msgspec
import structlog

from modelsmith.clock import utc_now
from modelsmith.errors import NotFound, SignatureError, ValidationError
from modelsmith.gpu.engine import Engine, Sampling
from modelsmith.gpu.engines import EnginePool
from modelsmith.gpu.named_engines import NamedEngines
from modelsmith.loop.cluster.fleet import ClusterRuntime, Fleet
from modelsmith.loop.eval.diagnose import diagnose_eval
from modelsmith.loop.jobs.registry import Job, JobRegistry
from modelsmith.loop.promotion.state import seen_nonces
from modelsmith.loop.records.approval import verify_approval
from modelsmith.loop.records.events import ScenariosAccepted as ScenariosAcceptedEvent
from modelsmith.loop.records.events import SynthFailed, SynthFinished, failure_of
from modelsmith.loop.scoring.scenarios import prompt_byte_limit, prompt_text, scenario_hash
from modelsmith.loop.synth.acceptance import ACCEPT_REQUEST_ID, acceptance_digest
from modelsmith.loop.synth.generate import (
    Generator,
    candidates_from_generator,
    load_generator,
    messages_hash,
    parse_reply,
    pattern_sources,
    teacher_messages,
)
from modelsmith.loop.synth.governance import (
    accept_into_core,
    accepted_file,
    publish,
    read_provenance,
    recover,
    write_kept,
)
from modelsmith.loop.synth.verify import Candidate, Verified, verify
from modelsmith.rpc.dispatch import MethodTable
from modelsmith.rpc.schema.synth import (
    ScenariosAccepted,
    ScenariosAcceptParams,
    SynthCountsView,
    SyntheticScenario,
    SynthList,
    SynthListParams,
    SynthRejection,
    SynthResult,
    SynthRunParams,
    SynthStarted,
)
from modelsmith.rpc.schema.train import FailurePattern
from modelsmith.rpc.server import CallContext

__all__ = ["SynthPlan", "SynthService"]

TEACHER_SAMPLING = Sampling(temperature=0.8, top_p=0.95, max_tokens=512, seed=0)
TEACHER_READY_S = 60.0
REJECTIONS_REPORTED = 50

log = structlog.get_logger("modelsmith.synth")


@dataclass(frozen=True)
class SynthPlan:
    """What a synth job will do, fixed before it is accepted."""

    eval_tag: str
    patterns: tuple[FailurePattern, ...]
    count: int
    teacher: str | None
    generator: str | None
    generator_fn: Generator | None


class SynthService:
    def __init__(self, fleet: Fleet, jobs: JobRegistry, engines: EnginePool | None,
                 named: NamedEngines | None, home: Path, *,
                 clock: Callable[[], datetime] = utc_now) -> None:
        self.fleet = fleet
        self.jobs = jobs
        self.engines = engines
        self.named = named if named is not None else NamedEngines({}, home=home)
        self.home = Path(home)
        self._clock = clock
        self._locks: dict[str, anyio.Lock] = {}
        self.teacher_ready_s = TEACHER_READY_S

    def _lock(self, cluster: str) -> anyio.Lock:
        return self._locks.setdefault(cluster, anyio.Lock())

    # -- planning (a worker thread) -----------------------------------------------------------
    def plan(self, runtime: ClusterRuntime, params: SynthRunParams) -> SynthPlan:
        runtime.require_ledger()
        runtime.require_catalog()
        diagnosis = diagnose_eval(runtime, params.from_eval)
        patterns = list(diagnosis.patterns)
        if params.pattern is not None:
            patterns = [p for p in patterns if p.pattern == params.pattern]
            if not patterns:
                raise NotFound(f"eval {params.from_eval!r} has no failure pattern {params.pattern!r}",
                               data={"field": "pattern", "known": [p.pattern for p in diagnosis.patterns]})
        if not patterns:
            raise ValidationError(f"eval {params.from_eval!r} has no failures to synthesise from",
                                  data={"field": "from_eval"})
        spec = runtime.cluster.config.synthesis.generator
        if params.teacher is not None:
            self.named.config(params.teacher)  # UnknownEngine, listing the known ones
            return SynthPlan(params.from_eval, tuple(patterns), params.count, params.teacher,
                             None, None)
        if spec is None:
            raise ValidationError(
                f"cluster {runtime.cluster.name} declares no [synthesis] generator: name a teacher "
                "engine (--teacher NAME, an [engines.NAME] of modelsmith.toml)",
                data={"field": "teacher"})
        return SynthPlan(params.from_eval, tuple(patterns), params.count, None, spec,
                         load_generator(spec))

    # -- the job ------------------------------------------------------------------------------
    def start(self, runtime: ClusterRuntime, plan: SynthPlan) -> Job:
        async def run(job: Job) -> dict[str, Any]:
            return await self._run(job, runtime, plan)

        log_path = runtime.cluster.logs_dir() / "synth-{job}.log"
        job = self.jobs.submit("synth", runtime.cluster.name, run)
        job.log_path = str(log_path).replace("{job}", job.job_id)
        return job

    async def _run(self, job: Job, runtime: ClusterRuntime, plan: SynthPlan) -> dict[str, Any]:
        try:
            return await self._synthesise(job, runtime, plan)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(runtime.record, SynthFailed(
                    job_id=job.job_id, error=failure_of(exc), eval_tag=plan.eval_tag))
            raise

    async def _synthesise(self, job: Job, runtime: ClusterRuntime, plan: SynthPlan) -> dict[str, Any]:
        catalog = runtime.require_catalog()
        candidates: list[Candidate] = []
        model = None
        async with contextlib.AsyncExitStack() as stack:
            engine = await self._teacher(stack, plan.teacher) if plan.teacher else None
            model = engine.info().model if engine is not None else None
            for number, pattern in enumerate(plan.patterns):
                job.set_progress(number, len(plan.patterns), f"synthesising for {pattern.pattern}")
                sources = pattern_sources(pattern, catalog)
                if not sources:
                    continue  # only held-out scenarios failed this way: nothing may be shown
                if engine is not None:
                    candidates += await self._ask(engine, pattern, sources, plan.count)
                else:
                    assert plan.generator_fn is not None and plan.generator is not None
                    candidates += await anyio.to_thread.run_sync(
                        candidates_from_generator, plan.generator_fn, plan.generator, pattern,
                        sources, plan.count)
        threshold = runtime.cluster.config.synthesis.near_duplicate_threshold
        limit = prompt_byte_limit(runtime.cluster.config.model.max_model_len)
        async with self._lock(runtime.cluster.name):
            catalog = runtime.require_catalog()
            verified: Verified = await anyio.to_thread.run_sync(
                lambda: verify(candidates, catalog, threshold=threshold, max_prompt_bytes=limit))
            file = sha = None
            if verified.kept:  # written under a pending name; published once recorded
                provenance = {"teacher": plan.teacher, "teacher_model": model,
                              "generator": plan.generator, "eval_tag": plan.eval_tag}
                file, sha = await anyio.to_thread.run_sync(
                    write_kept, runtime.cluster.scenarios_dir, job.job_id, verified.kept, provenance)
            c = verified.counts
            ids = [s.id for s, _ in verified.kept]
            await anyio.to_thread.run_sync(runtime.record, SynthFinished(
                job_id=job.job_id, eval_tag=plan.eval_tag, patterns=[p.pattern for p in plan.patterns],
                source_ids=sorted({cand.source.id for cand in candidates}),
                generated=c.generated, dropped_invalid=c.dropped_invalid,
                dropped_reference_fails=c.dropped_reference_fails,
                dropped_duplicate=c.dropped_duplicate, refused_near_held_out=c.refused_near_held_out,
                kept=c.kept, ids=ids, prompt_sha256=sorted({cand.prompt_sha256 for cand in candidates}),
                teacher=plan.teacher, teacher_model=model, generator=plan.generator, file=file,
                sha256=sha, near_duplicate_threshold=threshold))
            if file is not None:
                with anyio.CancelScope(shield=True):  # recorded: it must reach its set
                    await anyio.to_thread.run_sync(publish, runtime.cluster.scenarios_dir, file)
                    await anyio.to_thread.run_sync(runtime.reload_scenarios)
        job.set_progress(len(plan.patterns), len(plan.patterns),
                         f"kept {c.kept} of {c.generated} candidates")
        result = SynthResult(
            cluster=runtime.cluster.name, eval_tag=plan.eval_tag,
            patterns=[p.pattern for p in plan.patterns],
            counts=SynthCountsView(**vars(c)), ids=ids, file=file, teacher=plan.teacher,
            teacher_model=model, generator=plan.generator,
            rejections=[SynthRejection(pattern=candidates[r.index].pattern, reason=r.reason,
                                       detail=r.detail, match=r.match)
                        for r in verified.rejections[:REJECTIONS_REPORTED]])
        out: dict[str, Any] = msgspec.to_builtins(result)
        return out

    async def _teacher(self, stack: contextlib.AsyncExitStack, name: str) -> Engine:
        gate = self.engines.named_gate(name) if self.engines is not None else None
        if gate is not None:
            assert self.engines is not None
            engine: Engine = await stack.enter_async_context(gate.serving(self.engines.wait_awake_s))
            return engine
        engine = self.named.get(name)
        timeout = self.named.request_timeout(name) or self.teacher_ready_s
        await engine.wait_ready(min(self.teacher_ready_s, timeout))
        return engine

    async def _ask(self, engine: Engine, pattern: FailurePattern, sources: list[Any],
                   count: int) -> list[Candidate]:
        chats = [teacher_messages(pattern, sources[i % len(sources)], i) for i in range(count)]
        replies: dict[int, str] = {}
        stream = engine.generate_many(chats, TEACHER_SAMPLING)
        try:
            async for index, completion in stream:
                replies[index] = completion.text
        finally:
            close = getattr(stream, "aclose", None)
            if close is not None:
                with anyio.CancelScope(shield=True):
                    await close()
        out = []
        for index, chat in enumerate(chats):
            fields, error = None, None
            try:
                fields = parse_reply(replies.get(index, ""))
            except ValueError as exc:
                error = str(exc)
            out.append(Candidate(fields=fields, source=sources[index % len(sources)],
                                 pattern=pattern.pattern, prompt_sha256=messages_hash(chat),
                                 error=error))
        return out

    # -- listing and acceptance ---------------------------------------------------------------
    def recover(self, runtime: ClusterRuntime) -> list[str]:
        """Finish the synth writes and acceptances a crash interrupted (see
        :func:`~modelsmith.loop.synth.governance.recover`); blocking, before the daemon serves."""
        if runtime.ledger is None:
            return []
        finished = {r.event.file: r.event.sha256 for r in runtime.ledger.find(SynthFinished)
                    if r.event.file is not None and r.event.sha256 is not None}
        accepted = [(r.event.ids, r.event.file, r.event.digest)
                    for r in runtime.ledger.find(ScenariosAcceptedEvent)]
        done = recover(runtime.cluster.scenarios_dir, finished, accepted,
                       prompt_byte_limit(runtime.cluster.config.model.max_model_len))
        for line in done:
            log.warning("synthetic scenarios recovered", cluster=runtime.cluster.name, action=line)
        if done:
            runtime.reload_scenarios()
        return done

    def listing(self, cluster: str) -> SynthList:
        runtime = self.fleet.get(cluster)
        catalog = runtime.require_catalog()
        synthetic = catalog.sets.get("synthetic")
        provenance = read_provenance(runtime.cluster.scenarios_dir)
        scenarios = [
            SyntheticScenario(id=s.id, sha256=scenario_hash(s), prompt=prompt_text(s)[:2000],
                              reference=s.reference, provenance=provenance.get(s.id))
            for s in (synthetic.scenarios if synthetic else ())
        ]
        return SynthList(cluster=cluster, version=synthetic.version if synthetic else None,
                         scenarios=scenarios)

    def accept(self, params: ScenariosAcceptParams, now: datetime) -> ScenariosAccepted:
        """Verify the reviewer's statement and move the scenarios (blocking; under the lock)."""
        runtime = self.fleet.get(params.cluster)
        ledger = runtime.require_ledger()
        catalog = runtime.require_catalog()
        synthetic = catalog.sets.get("synthetic")
        by_id = {s.id: s for s in (synthetic.scenarios if synthetic else ())}
        missing = sorted(set(params.ids) - set(by_id))
        if missing:
            raise NotFound(f"no synthetic scenario {missing[0]!r} in {params.cluster}",
                           data={"scenario": missing[0], "field": "ids"})
        digest = acceptance_digest(params.cluster, [(i, scenario_hash(by_id[i])) for i in params.ids])
        verified = verify_approval(
            params.statement.encode("utf-8"), params.signature, self.home / "allowed_signers",
            expect_cluster=params.cluster, expect_request_digest=digest,
            seen_nonces=seen_nonces(ledger), now=now, principal=params.principal)
        said = verified.statement
        if said.decision != "accept" or said.request_id != ACCEPT_REQUEST_ID:
            raise SignatureError("the statement does not accept scenarios",
                                 data={"reason": "malformed", "field": "statement.decision"})
        ids = sorted(set(params.ids))
        limit = prompt_byte_limit(runtime.cluster.config.model.max_model_len)
        file, sha = accepted_file(runtime.cluster.scenarios_dir, ids, digest, limit)
        # The signed decision is recorded first: a crash before the move is finished by
        # recover() at the next start, never a core file without its acceptance.
        runtime.record(ScenariosAcceptedEvent(
            ids=ids, file=file, sha256=sha, digest=digest,
            principal=verified.principal, key_fingerprint=verified.key_fingerprint,
            nonce=said.nonce, statement=params.statement, signature=params.signature))
        accept_into_core(runtime.cluster.scenarios_dir, ids, digest, limit)
        runtime.reload_scenarios()
        return ScenariosAccepted(cluster=params.cluster, ids=sorted(set(params.ids)), file=file,
                                 principal=verified.principal,
                                 versions=dict(runtime.require_catalog().versions()))

    # -- RPC ----------------------------------------------------------------------------------
    def register(self, table: MethodTable) -> None:
        async def synth_run(params: SynthRunParams, ctx: CallContext) -> SynthStarted:
            runtime = self.fleet.get(params.cluster)
            plan = await anyio.to_thread.run_sync(self.plan, runtime, params)
            job = self.start(runtime, plan)
            return SynthStarted(job_id=job.job_id, status="started", cluster=params.cluster,
                                log=job.log_path or "")

        async def synth_list(params: SynthListParams, ctx: CallContext) -> SynthList:
            return await anyio.to_thread.run_sync(self.listing, params.cluster)

        async def scenarios_accept(params: ScenariosAcceptParams, ctx: CallContext) -> ScenariosAccepted:
            async with self._lock(params.cluster):
                return await anyio.to_thread.run_sync(self.accept, params, self._clock())

        table.add("synth.run", SynthRunParams, synth_run,
                  "Start a synth job: new scenarios like an eval's failure patterns, verified.")
        table.add("synth.list", SynthListParams, synth_list,
                  "The synthetic set: ids, content hashes, prompts, provenance.")
        table.add("scenarios.accept", ScenariosAcceptParams, scenarios_accept,
                  "Move synthetic scenarios into core (an SSH-signed statement).")
