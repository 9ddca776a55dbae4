"""Training jobs as Ray actors on a two-node Ray cluster on the CPU (ray.cluster_utils.Cluster).

The head node is "the daemon's box"; the second carries ``trainer_node`` and one (declared)
GPU, which the trainer asks for, so the GRPO job (the real trainer child on the tiny model) runs
on the other node's resources. Artifacts take the object-store route (no shared storage) and
are verified on arrival. A data-parallel job (``num_workers = 2``) runs as Ray Train's
TorchTrainer with one rank on each node. One cluster per module.

The second node's GPU is declared to Ray, not real (a hardware boundary): Ray schedules and
hands out its id as it would on a GPU box, so the per-node sleep rule is exercised as placed.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

pytest.importorskip("ray")

import ray
from ray.cluster_utils import Cluster

from modelsmith.errors import TrainerError
from modelsmith.gpu.adapters import verify_adapter
from modelsmith.gpu.engine import EngineInfo, EngineState
from modelsmith.gpu.engines import EnginePool, EngineSpec
from modelsmith.gpu.ray_backend import Placement, Unplaceable, cluster_nodes
from modelsmith.gpu.ray_config import RaySection
from modelsmith.gpu.ray_trainer import RayTrainerRunner
from modelsmith.gpu.trainer_process import retrying
from modelsmith.gpu.trainer_spec import (
    GrpoSpec,
    TrainerCheckpoint,
    TrainerEvent,
    TrainerMetric,
    TrainerStarted,
    TrainJobSpec,
)

from .test_trainer_process import make_spec, pid_is_gone, yes_no_model

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="session")]
__all__ = ["yes_no_model"]  # the fixture, shared with the local trainer's tests

RUN_TIMEOUT = 300


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Cluster]:
    """Two Ray nodes on this machine, one logical CPU each; torn down with the module."""
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"daemon_box": 1}, "include_dashboard": False})
    cluster.add_node(num_cpus=1, num_gpus=1, resources={"trainer_node": 1})
    ray.init(address=cluster.address, namespace="modelsmith-test", log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def runner_for(cluster: Cluster, **trainer: Any) -> RayTrainerRunner:
    return RayTrainerRunner(RaySection.model_validate({
        "address": cluster.address, "namespace": "modelsmith-test",
        "trainer": {"num_cpus": 1, "num_gpus": 0, "resources": {"trainer_node": 1}, **trainer}}))


def short_job(model: Path, root: Path, job_id: str) -> TrainJobSpec:
    spec = make_spec(model, root, job_id=job_id)
    grpo = GrpoSpec(max_steps=4, learning_rate=1e-2, num_generations=4,
                    per_device_train_batch_size=8, max_completion_length=8, beta=0.0,
                    save_steps=1)
    return TrainJobSpec(**{**{f: getattr(spec, f) for f in spec.__struct_fields__}, "grpo": grpo})


async def test_a_grpo_job_runs_on_the_other_nodes_resources_and_its_adapter_arrives_verified(
    ray_cluster: Cluster, yes_no_model: Path, tmp_path: Path,
) -> None:
    runner = runner_for(ray_cluster)
    spec = short_job(yes_no_model, tmp_path, "job-ray-1")
    events: list[TrainerEvent] = []
    placed: list[list[Placement]] = []
    with anyio.fail_after(RUN_TIMEOUT):
        outcome = await runner(spec, on_event=events.append, log_path=tmp_path / "train.log",
                               on_placed=placed.append)
    trainer_node = next(n for n in cluster_nodes() if "trainer_node" in n["resources"])
    assert [[p.node_id for p in ranks] for ranks in placed] == [[trainer_node["node_id"]]]
    assert placed[0][0].gpus == ()  # it asked for no GPU: none is named
    assert outcome.stopped is not None and outcome.stopped.reason == "completed"
    # The adapter arrived in the daemon's adapters/ and verifies against its manifest there.
    assert outcome.adapter_path == Path(spec.output_dir)
    assert outcome.adapter is not None
    assert verify_adapter(Path(spec.output_dir)).adapter_sha256 == outcome.adapter.adapter_sha256
    assert [e.step for e in events if isinstance(e, TrainerMetric)]
    # Every checkpoint the trainer reported travelled back into the job's work_dir.
    checkpoints = [e for e in events if isinstance(e, TrainerCheckpoint)]
    assert checkpoints
    for checkpoint in checkpoints:
        assert (Path(spec.work_dir) / "checkpoints" / Path(checkpoint.path).name).is_dir()
    assert (tmp_path / "train.log").read_bytes().count(b"\n") == len(events)
    assert runner.actors == {} and runner.placements == {}


async def kill_worker_on(runner: RayTrainerRunner, job_id: str, *, when: Any,
                         children: list[int]) -> Any:
    """An on_event that SIGKILLs the job's trainer actor (the Ray worker) the first time
    ``when(event)`` holds; the trainer child's pid is kept so the test can clean it up."""
    done = anyio.Event()

    async def on_event(event: TrainerEvent) -> None:
        if done.is_set() or not when(event):
            return
        done.set()
        actor = runner.actors[job_id]
        pid, child = await actor.__ray_call__.remote(
            lambda self: (os.getpid(), self._process.pid))
        children.append(child)
        os.kill(pid, signal.SIGKILL)

    return on_event


def reap(children: list[int]) -> None:
    for child in children:  # a trainer child the dead worker left, if Ray did not stop it
        if not pid_is_gone(child):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child, signal.SIGKILL)


async def test_a_killed_trainer_worker_fails_the_job_with_a_typed_error(
    ray_cluster: Cluster, yes_no_model: Path, tmp_path: Path,
) -> None:
    runner = runner_for(ray_cluster)
    spec = short_job(yes_no_model, tmp_path, "job-ray-2")
    children: list[int] = []
    on_event = await kill_worker_on(runner, spec.job_id, children=children,
                                    when=lambda e: isinstance(e, TrainerMetric))
    try:
        with anyio.fail_after(RUN_TIMEOUT), pytest.raises(TrainerError) as caught:
            await retrying(spec, 0, lambda run: runner(run, on_event=on_event,
                                                       log_path=tmp_path / "train.log"))
        # The trainer child does not outlive its worker (parent-death signal): no GPU is held.
        (child,) = children
        with anyio.fail_after(60):
            while not pid_is_gone(child):  # noqa: ASYNC110 (another process's state)
                await anyio.sleep(0.1)
    finally:
        reap(children)
    assert caught.value.data["reason"] == "worker_died"
    assert caught.value.data["attempts"] == 1
    assert trainer_node_id() in (caught.value.data["node"] or "")
    assert not await anyio.Path(spec.output_dir).exists()  # nothing half-arrived to be used


def trainer_node_id() -> str:
    node = next(n for n in cluster_nodes() if "trainer_node" in n["resources"])
    return str(node["node_id"])[:12]


async def test_with_retries_a_killed_worker_resumes_from_the_last_checkpoint_that_arrived(
    ray_cluster: Cluster, yes_no_model: Path, tmp_path: Path,
) -> None:
    runner = runner_for(ray_cluster)
    spec = short_job(yes_no_model, tmp_path, "job-ray-3")
    events: list[TrainerEvent] = []
    children: list[int] = []
    seen_checkpoint = []

    def after_a_checkpoint(event: TrainerEvent) -> bool:
        if isinstance(event, TrainerCheckpoint):
            seen_checkpoint.append(event)
            return False
        return bool(seen_checkpoint) and isinstance(event, TrainerMetric)

    killer = await kill_worker_on(runner, spec.job_id, children=children, when=after_a_checkpoint)

    async def on_event(event: TrainerEvent) -> None:
        events.append(event)
        await killer(event)

    retried: list[int] = []
    try:
        with anyio.fail_after(RUN_TIMEOUT * 2):
            outcome = await retrying(
                spec, 1, lambda run: runner(run, on_event=on_event, log_path=tmp_path / "train.log"),
                on_retry=lambda attempt, exc: retried.append(attempt))
    finally:
        reap(children)
    assert retried == [2]
    starts = [e for e in events if isinstance(e, TrainerStarted)]
    assert len(starts) == 2 and starts[0].resumed_from_step == 0
    assert starts[1].resumed_from_step >= 1  # the second attempt began at a shipped checkpoint
    assert outcome.stopped is not None and outcome.stopped.reason == "completed"
    assert outcome.adapter is not None
    assert verify_adapter(Path(spec.output_dir)).adapter_sha256 == outcome.adapter.adapter_sha256


async def test_a_job_asking_for_a_resource_the_cluster_lacks_is_refused(
    ray_cluster: Cluster, yes_no_model: Path, tmp_path: Path,
) -> None:
    runner = runner_for(ray_cluster, num_gpus=2)
    spec = short_job(yes_no_model, tmp_path, "job-ray-4")
    with anyio.fail_after(60), pytest.raises(Unplaceable) as caught:
        await runner(spec, on_event=lambda e: None, log_path=tmp_path / "train.log")
    assert caught.value.data["resource"] == "GPU" and caught.value.data["requested"] == 2
    assert runner.queue.waiting() == []  # never queued
    assert not (tmp_path / "train.log").exists()


async def test_a_job_asking_for_more_workers_than_the_cluster_can_place_is_refused(
    ray_cluster: Cluster, yes_no_model: Path, tmp_path: Path,
) -> None:
    runner = runner_for(ray_cluster, resources={})  # one CPU per worker: two nodes hold two
    spec = msgspec.structs.replace(short_job(yes_no_model, tmp_path, "job-ray-5"), num_workers=3)
    with anyio.fail_after(60), pytest.raises(Unplaceable) as caught:
        await runner(spec, on_event=lambda e: None, log_path=tmp_path / "train.log")
    assert caught.value.data["resource"] == "workers" and caught.value.data["requested"] == 3
    assert "3 workers" in str(caught.value)
    assert runner.queue.waiting() == [] and runner.actors == {}


async def test_a_data_parallel_job_runs_one_rank_on_each_node_as_ray_trains_torchtrainer(
    ray_cluster: Cluster, yes_no_model: Path, tmp_path: Path,
) -> None:
    runner = runner_for(ray_cluster, resources={})
    spec = msgspec.structs.replace(short_job(yes_no_model, tmp_path, "job-ray-dp"), num_workers=2)
    events: list[TrainerEvent] = []
    placed: list[list[Placement]] = []
    with anyio.fail_after(RUN_TIMEOUT * 2):
        outcome = await runner(spec, on_event=events.append, log_path=tmp_path / "train.log",
                               on_placed=placed.append)
    # Both ranks were placed, each on its own node (one CPU each), and shown by rank.
    assert sorted(p.node_id for p in placed[-1]) == sorted(n["node_id"] for n in cluster_nodes())
    (started,) = [e for e in events if isinstance(e, TrainerStarted)]  # rank 0 speaks for the job
    assert (started.world_size, started.rank) == (2, 0)
    assert outcome.stopped is not None and outcome.stopped.reason == "completed"
    assert outcome.adapter is not None
    assert verify_adapter(Path(spec.output_dir)).adapter_sha256 == outcome.adapter.adapter_sha256
    assert [e.step for e in events if isinstance(e, TrainerMetric)][-1] == spec.grpo.max_steps
    assert runner.actors == {} and runner.placements == {}


@dataclass
class PlacedEngine:
    """An engine in a Ray actor as the daemon's pool sees it (kind "vllm-ray", its placement):
    the Engine methods the pool's gate uses, recording each sleep and wake against the trainer's
    event count (a fake at the process boundary: a real one is an actor with vLLM inside)."""

    name: str
    placement: Placement
    events: list[TrainerEvent]
    log: list[tuple[str, int]] = field(default_factory=list)
    sleeping: bool = False

    def info(self) -> EngineInfo:
        return EngineInfo(name=self.name, model="tiny", kind="vllm-ray",
                          state=EngineState.SLEEPING if self.sleeping else EngineState.WARM,
                          node=self.placement.node_id, node_gpus=list(self.placement.gpus))

    async def wait_ready(self, timeout: float) -> None:  # noqa: ASYNC109
        return None

    async def sleep(self, level: int = 1) -> None:
        self.sleeping = True
        self.log.append(("sleep", len(self.events)))

    async def wake_up(self) -> None:
        self.sleeping = False
        self.log.append(("wake", len(self.events)))


async def test_engines_sharing_the_trainers_gpu_on_its_node_sleep_while_it_trains(
    ray_cluster: Cluster, yes_no_model: Path, tmp_path: Path,
) -> None:
    runner = runner_for(ray_cluster, num_gpus=0.5)
    spec = short_job(yes_no_model, tmp_path, "job-ray-6")
    events: list[TrainerEvent] = []
    trainer_node = next(n for n in cluster_nodes() if "trainer_node" in n["resources"])
    head = next(n for n in cluster_nodes() if "daemon_box" in n["resources"])
    # The daemon's pool, as in loop/train/service.py: an engine on the trainer's node and GPU
    # id (Ray hands out "0", the node's one GPU), one on another node's GPU 0, one on the same
    # node without a GPU in common.
    engines = {
        "here": PlacedEngine("here", Placement(trainer_node["node_id"], trainer_node["ip"], ("0",)),
                             events),
        "other-node": PlacedEngine("other-node", Placement(head["node_id"], head["ip"], ("0",)),
                                   events),
        "other-gpu": PlacedEngine("other-gpu",
                                  Placement(trainer_node["node_id"], trainer_node["ip"], ("1",)),
                                  events),
    }
    pool = EnginePool(factory=lambda name, engine_spec: engines[engine_spec.model.name])  # type: ignore[arg-type,return-value]
    template = EngineSpec(model=Path("here"), kind="vllm", dtype="auto", max_model_len=512,
                          url=None, api_key_env=None, gpu_memory_utilization=0.5,
                          tensor_parallel_size=1, max_lora_rank=8, max_loras=2)
    for name in engines:
        pool.add_cluster(name, replace(template, model=Path(name)))

    with anyio.fail_after(RUN_TIMEOUT):
        outcome = await runner(spec, on_event=events.append, log_path=tmp_path / "train.log",
                               residents=pool.co_located)
    assert outcome.stopped is not None and outcome.stopped.reason == "completed"
    # Asleep before the trainer's first event, awake only after its last; the others served on.
    assert engines["here"].log == [("sleep", 0), ("wake", len(events))]
    assert engines["other-node"].log == [] and engines["other-gpu"].log == []
    assert not pool.gate_for("here").asleep
