"""The engine yields a shared GPU to the trainer: the real train service, lease manager and
engine pool; a fake GPU list at NVML (the hardware boundary); the real trainer child on the tiny
model; an engine that records the order of calls (a fake of the vLLM process boundary that
implements the whole Engine protocol and refuses to generate while asleep)."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
from support.promotion_home import CLUSTER, CORE_IDS, HELD_IDS, PromotionHome

from modelsmith.daemon.app import engine_spec_for
from modelsmith.errors import EngineError
from modelsmith.gpu.engine import (
    Completion,
    EngineInfo,
    EngineLifecycle,
    EngineState,
    PromptInput,
    Sampling,
    generate_concurrently,
)
from modelsmith.gpu.engines import EnginePool, EngineSpec
from modelsmith.gpu.leases import LeaseManager
from modelsmith.loop.eval.service import EvalService
from modelsmith.loop.jobs.registry import Job, JobRegistry
from modelsmith.loop.train.service import TrainService
from modelsmith.rpc.schema.evals import EvalRunParams
from modelsmith.rpc.schema.train import TrainOverrides, TrainStartParams

from .conftest import wait_until
from .fake_nvml import FakeNvml

RUN_TIMEOUT = 300.0
ENGINE_PID = 4242


class RecordingEngine:
    """Every call, in order, with what the train job had reported when it came."""

    kind = "vllm"

    def __init__(self, name: str, trainer_phase: list[str]) -> None:
        self.name = name
        self.lifecycle = EngineLifecycle(name)
        self.calls: list[tuple[str, str]] = []
        self.adapters: list[str] = []
        self._phase = trainer_phase  # "none" | "started" | "stopped", kept by the test

    def _record(self, call: str) -> None:
        self.calls.append((call, self._phase[-1]))

    def info(self) -> EngineInfo:
        return EngineInfo(name=self.name, model="tiny", kind=self.kind, state=self.lifecycle.state,
                          adapters=list(self.adapters), pid=ENGINE_PID)

    async def wait_ready(self, timeout: float) -> None:  # noqa: ASYNC109
        await self.lifecycle.wait_ready(timeout)

    async def generate(self, prompt: PromptInput, sampling: Sampling, *,
                       adapter: str | None = None) -> Completion:
        self._record("generate" if self.lifecycle.state is EngineState.WARM else "generate-asleep")
        self.lifecycle.require(EngineState.WARM)
        await anyio.lowlevel.checkpoint()
        return Completion(text="4", token_count=1, finish_reason="stop")

    async def generate_many(self, prompts: Sequence[PromptInput], sampling: Sampling, *,
                            adapter: str | None = None) -> AsyncIterator[tuple[int, Completion]]:
        async def one(prompt: PromptInput) -> Completion:
            return await self.generate(prompt, sampling, adapter=adapter)

        async for item in generate_concurrently(one, prompts):
            yield item

    async def load_adapter(self, name: str, path: Path) -> None:
        self._record("load_adapter")
        self.lifecycle.require(EngineState.WARM)
        self.adapters.append(name)

    async def unload_adapter(self, name: str) -> None:
        self.adapters.remove(name)

    async def sleep(self, level: int = 1) -> None:
        self._record(f"sleep({level})")
        self.lifecycle.set(EngineState.SLEEPING)

    async def wake_up(self) -> None:
        self._record("wake_up")
        self.lifecycle.set(EngineState.WARM)

    async def health(self) -> bool:
        return self.lifecycle.state in (EngineState.WARM, EngineState.SLEEPING)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self.lifecycle.set(EngineState.WARM)
        task_status.started()
        try:
            await anyio.sleep_forever()
        finally:
            self.lifecycle.set(EngineState.COLD)


@dataclass
class Box:
    train: TrainService
    evals: EvalService
    pool: EnginePool
    leases: LeaseManager
    engine: RecordingEngine
    phase: list[str]
    model_dir: Path
    jobs: JobRegistry


@pytest.fixture
def box(tmp_path: Path, tiny_model_dir: Path) -> Box:
    home = PromotionHome(tmp_path / "home")
    model_dir = home.root / "models" / "tiny-llama"
    shutil.copytree(tiny_model_dir, model_dir)
    home.add_eval("base-eval", None, set(CORE_IDS[3:] + HELD_IDS[:1]))
    fleet, runtime = home.open()
    phase = ["none"]
    engines: list[RecordingEngine] = []

    def factory(name: str, spec: EngineSpec) -> RecordingEngine:
        engines.append(RecordingEngine(name, phase))
        return engines[-1]

    pool = EnginePool(factory)  # type: ignore[arg-type]
    pool.add_cluster(CLUSTER, engine_spec_for(runtime.cluster))
    nvml = FakeNvml(["NVIDIA H200"], processes={0: [(ENGINE_PID, 120 << 30)]})
    leases = LeaseManager(nvml=nvml)
    for gate, tensor_parallel_size in pool.residents():  # as the daemon wires them
        gate.devices = leases.add_engine(gate, tensor_parallel_size)
    jobs = JobRegistry()
    evals = EvalService(fleet, jobs, pool)
    train = TrainService(fleet, jobs, pool, evals, leases)
    return Box(train, evals, pool, leases, engines[0], phase, model_dir, jobs)


@asynccontextmanager
async def services(box: Box) -> AsyncIterator[anyio.abc.TaskGroup]:
    """The job registry and the engine pool running, as the daemon starts them."""
    async with anyio.create_task_group() as tg:
        await tg.start(box.jobs.run)
        await tg.start(box.pool.run)
        yield tg
        tg.cancel_scope.cancel()


def start_training(box: Box, max_steps: int = 2) -> Job:
    params = TrainStartParams(cluster=CLUSTER, eval_tag="base-eval", follow_up_eval=False,
                              overrides=TrainOverrides(max_steps=max_steps, save_steps=1000))
    prepared = box.train.prepare(params, "train-1")
    job, _ = box.train.start(params, "train-1", prepared)
    return job


async def follow_trainer(box: Box, job: Job) -> None:
    """Keep the phase the engine records: the trainer's own started and stopped events."""
    async for event in job.watch():
        if event.data.get("event") == "started":
            box.phase.append("started")
        elif event.data.get("event") == "stopped" or (event.kind == "state" and event.data.get(
                "state") in ("failed", "cancelled", "succeeded")):
            if box.phase[-1] != "stopped":
                box.phase.append("stopped")
        if event.kind == "state" and event.data.get("state") in ("failed", "cancelled", "succeeded"):
            return


async def test_the_engine_sleeps_before_the_trainer_wakes_after_it_and_only_then_loads_the_adapter_while_evals_wait(
    box: Box,
) -> None:
    with anyio.fail_after(RUN_TIMEOUT):
        async with services(box) as tg:
            job = start_training(box)
            tg.start_soon(follow_trainer, box, job)
            await wait_until(lambda: box.engine.lifecycle.state is EngineState.SLEEPING, RUN_TIMEOUT)
            (status,) = box.pool.statuses(box.leases.memory_mb)
            assert status.state == "sleeping" and status.devices == [0] and status.memory_mb == 120 << 10
            eval_job, _ = box.evals.start(EvalRunParams(cluster=CLUSTER, type="core", adapter="base"))
            await wait_until(lambda: "waiting for the engine to wake" in (eval_job.message or ""),
                             RUN_TIMEOUT)
            await job.wait_finished()
            await eval_job.wait_finished()
            (status,) = box.pool.statuses(box.leases.memory_mb)

    assert job.state.value == "succeeded", job.summary()
    assert eval_job.state.value == "succeeded", eval_job.summary()
    assert job.result is not None and "hot_load_seconds" in job.result
    calls = box.engine.calls
    assert calls[0] == ("sleep(1)", "none")  # before the trainer started
    wake = calls.index(("wake_up", "stopped"))  # after it ended
    assert [c for c, _ in calls[1:wake]] == []  # nothing reached the engine while it slept
    assert ("load_adapter", "stopped") in calls[wake:]
    assert all(call != "generate-asleep" for call, _ in calls)
    assert sum(call == "generate" for call, _ in calls) >= len(CORE_IDS)  # the eval ran, after the wake
    assert status.state == "warm" and f"{CLUSTER}:iter-1" in status.adapters


async def test_the_engine_wakes_when_the_trainer_fails_and_nothing_is_hot_loaded(box: Box) -> None:
    (box.model_dir / "model.safetensors").write_bytes(b"not a checkpoint")
    with anyio.fail_after(RUN_TIMEOUT):
        async with services(box) as tg:
            job = start_training(box)
            tg.start_soon(follow_trainer, box, job)
            await job.wait_finished()
            state_after = box.engine.lifecycle.state

    assert job.state.value == "failed", job.summary()
    assert [c for c, _ in box.engine.calls] == ["sleep(1)", "wake_up"]
    assert box.engine.calls[0][1] == "none" and state_after is EngineState.WARM


async def test_the_engine_wakes_when_the_training_job_is_cancelled(box: Box) -> None:
    with anyio.fail_after(RUN_TIMEOUT):
        async with services(box) as tg:
            job = start_training(box, max_steps=10_000)
            tg.start_soon(follow_trainer, box, job)
            await wait_until(lambda: any(e.kind == "metric" for e in job.events), RUN_TIMEOUT)
            box.train.jobs.cancel(job.job_id)
            await job.wait_finished()
            (status,) = box.pool.statuses()

    assert job.state.value == "cancelled", job.summary()
    assert [c for c, _ in box.engine.calls] == ["sleep(1)", "wake_up"]
    assert box.engine.calls[0][1] == "none"
    assert status.state == "warm"


async def test_an_eval_that_waits_longer_than_its_bound_fails_typed_and_never_meets_the_sleeping_engine(
    box: Box,
) -> None:
    gate = box.pool.gate_for(CLUSTER)
    with anyio.fail_after(RUN_TIMEOUT):
        async with services(box):
            await gate.sleep(1)
            with pytest.raises(EngineError) as caught:
                async with box.pool.serving(CLUSTER, timeout=0.05):
                    pass
            await gate.wake_up()
            async with box.pool.serving(CLUSTER, timeout=1) as engine:
                assert engine is box.engine
    assert caught.value.data["reason"] == "asleep"
    assert [c for c, _ in box.engine.calls] == ["sleep(1)", "wake_up"]
