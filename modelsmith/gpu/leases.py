"""Device inventory and leases: a trainer and an engine never oversubscribe one accelerator.

Trainers take an exclusive lease on a device; jobs wait in FIFO order when it is busy and see
their queue position. Engines are *residents* of the devices they span (registered by the
daemon: an engine with ``tensor_parallel_size`` N on the first N GPUs; on a CPU box, on the CPU
device). When a trainer's lease is granted on a GPU with residents they are put to sleep
(level 1) before the lease is handed over, and woken when the holder calls
:meth:`Lease.wake_residents` or, at the latest, when the lease ends: shielded and time-bounded,
also when the trainer fails or is cancelled. On the CPU residents are not put to sleep: vLLM's
CPU build has no sleep mode, so sleeping would free nothing and only stall evals.

Which device a trainer takes is its *preference* (``[training] device``): ``"auto"`` a device
without residents if there is one (the least busy), else the least busy shared one (its
residents sleep); ``"shared"`` always a device with residents; an index, that device.

The inventory comes from NVML (``pynvml``, from the ``nvidia-ml-py`` package) behind one
function, :func:`discover_devices`, whose NVML module can be handed in (a test hands in a fake
that returns a GPU list as NVML would: the hardware boundary). The same module answers the
per-process device memory that ``daemon.status`` shows for each engine.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import anyio
import structlog

from modelsmith.errors import ValidationError

__all__ = [
    "SLEEP_WAKE_TIMEOUT_S",
    "Device",
    "DevicePreference",
    "Lease",
    "LeaseManager",
    "Resident",
    "discover_devices",
    "load_nvml",
]

log = structlog.get_logger("modelsmith.leases")

SLEEP_WAKE_TIMEOUT_S = 120.0
"""Bound on waking all residents of a device after a lease (shielded)."""

DevicePreference = Literal["auto", "shared"] | int


@dataclass(frozen=True, slots=True)
class Device:
    index: int
    kind: str  # "cuda" | "cpu"
    name: str
    memory_total_mb: int | None


class Resident(Protocol):
    """What a lease needs of an engine that lives on a device (the pool's gate for an engine)."""

    name: str

    async def sleep(self, level: int = 1) -> None:
        """Release the device memory; bounded by the resident itself."""
        ...

    async def wake_up(self) -> None:
        """Undo sleep(); a resident that is awake stays awake."""
        ...


def load_nvml(nvml: Any | None = None) -> Any | None:
    """The NVML module, initialised; ``None`` where there is no NVML library or no driver."""
    try:
        module: Any = importlib.import_module("pynvml") if nvml is None else nvml
        module.nvmlInit()
    except Exception:  # no NVML library or no driver: a CPU box
        return None
    return module


def discover_devices(nvml: Any | None = None) -> list[Device]:
    """The GPUs NVML lists (``nvml``: the module, ``pynvml`` by default); else the CPU."""
    module = load_nvml(nvml)
    if module is not None:
        try:
            devices = []
            for i in range(module.nvmlDeviceGetCount()):
                handle = module.nvmlDeviceGetHandleByIndex(i)
                name = module.nvmlDeviceGetName(handle)
                mem = module.nvmlDeviceGetMemoryInfo(handle)
                devices.append(Device(i, "cuda", name if isinstance(name, str) else name.decode(),
                                      int(mem.total) // (1 << 20)))
            if devices:
                return devices
        except Exception:
            log.exception("NVML is there but could not list the GPUs; using the CPU")
    return [Device(0, "cpu", f"cpu ({os.cpu_count()} cores)", None)]


def process_tree(pid: int) -> set[int]:
    """``pid`` and its descendants (vLLM's tensor-parallel workers are children of the core)."""
    pids, todo = {pid}, [pid]
    while todo:
        current = todo.pop()
        try:
            tasks = Path(f"/proc/{current}/task").iterdir()
            children = {int(c) for t in tasks for c in (t / "children").read_text().split()}
        except (OSError, ValueError):
            continue
        todo.extend(children - pids)
        pids |= children
    return pids


@dataclass(eq=False)
class _Waiter:
    owner: str
    granted: anyio.Event = field(default_factory=anyio.Event)
    on_position: Callable[[int | None], None] | None = None


@dataclass(eq=False)
class DeviceSlot:
    device: Device
    holder: str | None = None
    queue: list[_Waiter] = field(default_factory=list)
    residents: list[Resident] = field(default_factory=list)

    @property
    def load(self) -> int:
        return (self.holder is not None) + len(self.queue)


@dataclass(eq=False)
class Lease:
    """A granted lease: the device, and the residents slept for it."""

    device: Device
    slept: list[Resident]
    _woken: bool = False

    async def wake_residents(self) -> None:
        """Wake what was slept for this lease (once; shielded, bounded; errors are logged)."""
        if self._woken:
            return
        self._woken = True
        with anyio.CancelScope(shield=True), anyio.move_on_after(SLEEP_WAKE_TIMEOUT_S) as scope:
            for resident in reversed(self.slept):
                try:
                    await resident.wake_up()
                except Exception:
                    log.exception("engine did not wake up", engine=resident.name)
        if scope.cancelled_caught:
            log.error("engines not awake in time", timeout_s=SLEEP_WAKE_TIMEOUT_S,
                      engines=[r.name for r in self.slept])


class LeaseManager:
    def __init__(self, devices: list[Device] | None = None, *, nvml: Any | None = None) -> None:
        """``devices`` default to :func:`discover_devices` with ``nvml``; with both given, NVML
        also answers the per-process memory of :meth:`memory_mb` (None without NVML)."""
        self._nvml = load_nvml(nvml) if (nvml is not None or devices is None) else None
        self.slots = [DeviceSlot(d) for d in (devices or discover_devices(self._nvml))]

    # -- residents -----------------------------------------------------------------------
    def add_resident(self, engine: Resident, device_index: int = 0) -> None:
        self.slots[device_index].residents.append(engine)

    def add_engine(self, engine: Resident, tensor_parallel_size: int = 1) -> list[int]:
        """Make ``engine`` a resident of the devices it spans; returns their indices.

        vLLM in this process places an engine on the first ``tensor_parallel_size`` visible
        GPUs; on a CPU box every engine lives on the CPU device.
        """
        gpus = [s.device.index for s in self.slots if s.device.kind == "cuda"]
        span = gpus[:tensor_parallel_size] if gpus else [self.slots[0].device.index]
        if gpus and len(span) < tensor_parallel_size:
            log.warning("engine spans more GPUs than the box has", engine=engine.name,
                        tensor_parallel_size=tensor_parallel_size, gpus=len(gpus))
        for index in span:
            self.add_resident(engine, index)
        return span

    def memory_mb(self, pid: int | None, devices: Collection[int]) -> int | None:
        """Device memory (MiB) that process ``pid`` and its children use on ``devices``, by
        NVML; None on the CPU, without NVML, or without a pid."""
        if self._nvml is None or pid is None:
            return None
        pids = process_tree(pid)
        used = 0
        try:
            for index in devices:
                handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
                for proc in self._nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if proc.pid in pids and proc.usedGpuMemory is not None:
                        used += int(proc.usedGpuMemory)
        except Exception:
            return None
        return used // (1 << 20)

    # -- choosing a device -----------------------------------------------------------------
    def choose_device(self, preference: DevicePreference = "auto") -> int:
        """The device index a trainer with ``preference`` queues for (see the module doc)."""
        if isinstance(preference, int):
            if not 0 <= preference < len(self.slots):
                raise ValidationError(
                    f"training.device {preference} is not a device of this box "
                    f"(devices 0..{len(self.slots) - 1})", data={"field": "training.device"})
            return preference
        shared = [s for s in self.slots if s.residents]
        free = [s for s in self.slots if not s.residents]
        pool = free if preference == "auto" and free else (shared or free)
        return min(pool, key=lambda s: (s.load, s.device.index)).device.index

    # -- leases ------------------------------------------------------------------------------
    def _notify_positions(self, slot: DeviceSlot) -> None:
        for i, waiter in enumerate(slot.queue):
            if waiter.on_position:
                waiter.on_position(i + 1)

    @asynccontextmanager
    async def lease(
        self,
        owner: str,
        *,
        device: DevicePreference = "auto",
        on_position: Callable[[int | None], None] | None = None,
    ) -> AsyncIterator[Lease]:
        """Hold a device exclusively for a trainer; queue (FIFO) while it is busy.

        Residents of a GPU are slept before this yields and woken (shielded, bounded) by
        :meth:`Lease.wake_residents` or when the block ends, however it ends. A resident
        that cannot be put to sleep (it is busy past its bound) fails the lease with its
        EngineError, after waking the ones already asleep.
        """
        slot = self.slots[self.choose_device(device)]
        waiter = _Waiter(owner, on_position=on_position)
        if slot.holder is None and not slot.queue:
            slot.holder = owner
        else:
            slot.queue.append(waiter)
            self._notify_positions(slot)
            try:
                await waiter.granted.wait()
            except BaseException:
                if waiter in slot.queue:
                    slot.queue.remove(waiter)
                    self._notify_positions(slot)
                elif slot.holder == owner:
                    self._release(slot)
                raise
        if on_position:
            on_position(None)
        lease = Lease(slot.device, [])
        try:
            if slot.device.kind == "cuda":
                for resident in slot.residents:
                    # Listed before it sleeps: a sleep cut short is woken as well.
                    lease.slept.append(resident)
                    await resident.sleep(1)
            yield lease
        finally:
            await lease.wake_residents()
            self._release(slot)

    def _release(self, slot: DeviceSlot) -> None:
        slot.holder = None
        if slot.queue:
            nxt = slot.queue.pop(0)
            slot.holder = nxt.owner
            nxt.granted.set()
            self._notify_positions(slot)

    def statistics(self) -> list[dict[str, Any]]:
        return [{"device": s.device.name, "index": s.device.index, "kind": s.device.kind,
                 "holder": s.holder, "queued": [w.owner for w in s.queue],
                 "residents": [r.name for r in s.residents]} for s in self.slots]

