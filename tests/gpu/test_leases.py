"""Device leases: FIFO queueing, cancelled waiters, residents slept only on GPUs, device choice."""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio
import pytest

from modelsmith.errors import ValidationError
from modelsmith.gpu.leases import Device, LeaseManager, discover_devices

from .fake_nvml import FakeNvml

CPU = Device(index=0, kind="cpu", name="cpu (2 cores)", memory_total_mb=None)
GPU = Device(index=0, kind="cuda", name="H200", memory_total_mb=143_000)
WAIT_S = 5.0


@dataclass(eq=False)
class RecordingEngine:
    """Implements the two Engine methods a lease uses; records the calls (a hardware boundary)."""

    name: str
    calls: list[str] = field(default_factory=list)

    async def sleep(self, level: int = 1) -> None:
        self.calls.append(f"sleep({level})")

    async def wake_up(self) -> None:
        self.calls.append("wake_up")


async def test_waiters_are_granted_in_fifo_order_and_see_their_queue_positions() -> None:
    leases = LeaseManager([CPU])
    order: list[str] = []
    positions: dict[str, list[int | None]] = {"b": [], "c": []}
    first_held, release_first = anyio.Event(), anyio.Event()

    async def first() -> None:
        async with leases.lease("a"):
            first_held.set()
            await release_first.wait()
            order.append("a")

    async def waiter(owner: str, queued: anyio.Event) -> None:
        def seen(position: int | None) -> None:
            positions[owner].append(position)
            if position is not None:
                queued.set()

        async with leases.lease(owner, on_position=seen):
            order.append(owner)

    with anyio.fail_after(WAIT_S):
        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            await first_held.wait()
            b_queued, c_queued = anyio.Event(), anyio.Event()
            tg.start_soon(waiter, "b", b_queued)
            await b_queued.wait()
            tg.start_soon(waiter, "c", c_queued)
            await c_queued.wait()
            assert leases.statistics()[0]["holder"] == "a"
            assert leases.statistics()[0]["queued"] == ["b", "c"]
            release_first.set()

    assert order == ["a", "b", "c"]
    assert positions["b"][0] == 1 and positions["b"][-1] is None
    assert positions["c"][0] == 2 and 1 in positions["c"] and positions["c"][-1] is None
    assert leases.statistics()[0]["holder"] is None


async def test_a_cancelled_waiter_leaves_the_queue_and_the_next_one_moves_up() -> None:
    leases = LeaseManager([CPU])
    granted: list[str] = []
    c_positions: list[int | None] = []
    held, release = anyio.Event(), anyio.Event()
    b_queued, c_queued = anyio.Event(), anyio.Event()

    async def holder() -> None:
        async with leases.lease("a"):
            held.set()
            await release.wait()

    async def waiter_b(scope_out: list[anyio.CancelScope]) -> None:
        with anyio.CancelScope() as scope:
            scope_out.append(scope)
            async with leases.lease("b", on_position=lambda p: b_queued.set()):
                granted.append("b")

    async def waiter_c() -> None:
        def seen(position: int | None) -> None:
            c_positions.append(position)
            c_queued.set()

        async with leases.lease("c", on_position=seen):
            granted.append("c")

    with anyio.fail_after(WAIT_S):
        async with anyio.create_task_group() as tg:
            tg.start_soon(holder)
            await held.wait()
            scopes: list[anyio.CancelScope] = []
            tg.start_soon(waiter_b, scopes)
            await b_queued.wait()
            tg.start_soon(waiter_c)
            await c_queued.wait()
            scopes[0].cancel()
            await anyio.wait_all_tasks_blocked()
            assert leases.statistics()[0]["queued"] == ["c"]
            release.set()

    assert granted == ["c"]
    assert c_positions[:2] == [2, 1] and c_positions[-1] is None


@pytest.mark.parametrize(("device", "expected"), [(GPU, ["sleep(1)", "wake_up"]), (CPU, [])])
async def test_residents_sleep_for_a_trainer_only_on_a_cuda_device(
    device: Device, expected: list[str]
) -> None:
    leases = LeaseManager([device])
    engine = RecordingEngine("tiny")
    leases.add_resident(engine)

    with anyio.fail_after(WAIT_S):
        async with leases.lease("trainer") as leased:
            assert leased.device == device
            assert engine.calls == expected[:1]

    assert engine.calls == expected


async def test_residents_wake_even_when_the_trainer_fails() -> None:
    leases = LeaseManager([GPU])
    engine = RecordingEngine("tiny")
    leases.add_resident(engine)

    with anyio.fail_after(WAIT_S), pytest.raises(RuntimeError):
        async with leases.lease("trainer"):
            raise RuntimeError("trainer crashed")

    assert engine.calls == ["sleep(1)", "wake_up"]
    assert leases.statistics()[0]["holder"] is None


def test_discovery_lists_the_gpus_nvml_reports_and_falls_back_to_the_cpu() -> None:
    gpus = discover_devices(FakeNvml(["NVIDIA H200", "NVIDIA H200"], total_bytes=140 << 30))
    assert [(d.index, d.kind, d.name, d.memory_total_mb) for d in gpus] == [
        (0, "cuda", "NVIDIA H200", 140 << 10), (1, "cuda", "NVIDIA H200", 140 << 10)]
    (cpu,) = discover_devices(FakeNvml([]))
    assert cpu.kind == "cpu" and cpu.memory_total_mb is None


async def test_on_two_gpus_auto_picks_the_gpu_without_an_engine_and_sleeps_nothing() -> None:
    leases = LeaseManager(nvml=FakeNvml(["H200", "H200"]))
    engine = RecordingEngine("tiny")
    assert leases.add_engine(engine, tensor_parallel_size=1) == [0]

    with anyio.fail_after(WAIT_S):
        async with leases.lease("trainer", device="auto") as lease:
            assert lease.device.index == 1 and lease.slept == []
        async with leases.lease("trainer", device="shared") as lease:
            assert lease.device.index == 0 and engine.calls == ["sleep(1)"]

    assert engine.calls == ["sleep(1)", "wake_up"]


async def test_an_engine_spanning_every_gpu_leaves_auto_nothing_but_sharing() -> None:
    leases = LeaseManager(nvml=FakeNvml(["H200", "H200"]))
    engine = RecordingEngine("tp2")
    assert leases.add_engine(engine, tensor_parallel_size=2) == [0, 1]

    with anyio.fail_after(WAIT_S):
        async with leases.lease("trainer") as lease:
            assert lease.slept == [engine] and engine.calls == ["sleep(1)"]
    assert engine.calls == ["sleep(1)", "wake_up"]


def test_a_device_index_outside_the_box_is_refused_naming_the_field() -> None:
    leases = LeaseManager(nvml=FakeNvml(["H200"]))
    with pytest.raises(ValidationError) as caught:
        leases.choose_device(3)
    assert caught.value.data["field"] == "training.device"


def test_engine_memory_is_what_nvml_reports_for_its_process_and_none_on_the_cpu() -> None:
    import os

    nvml = FakeNvml(["H200"], processes={0: [(os.getpid(), 3 << 30), (1, 5 << 30)]})
    assert LeaseManager(nvml=nvml).memory_mb(os.getpid(), [0]) == 3 << 10
    assert LeaseManager([CPU]).memory_mb(os.getpid(), [0]) is None
