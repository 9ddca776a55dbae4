"""Device inventory and leases: a trainer and an engine never oversubscribe one accelerator.

Trainers take an exclusive lease on a device; jobs wait in FIFO order when it is busy and see
their queue position. Engines are *residents* of a device: when a trainer's lease is granted on
a GPU that warm engines share, they are put to sleep (level 1) before the trainer starts and
woken after it ends, both under a shielded, time-bounded scope. On the CPU there is one device
with room for one trainer; engines are not put to sleep (sleep is a no-op there anyway).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog

log = structlog.get_logger("modelsmith.leases")

SLEEP_WAKE_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class Device:
    index: int
    kind: str  # "cuda" | "cpu"
    name: str
    memory_total_mb: int | None


def discover_devices() -> list[Device]:
    """NVML when it is there and finds GPUs; the CPU otherwise."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
            devices = []
            for i in range(count):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(handle)
                mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
                devices.append(Device(i, "cuda", name if isinstance(name, str) else name.decode(),
                                      int(mem.total) // (1 << 20)))
            if devices:
                return devices
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML library or no driver: a CPU box
        pass
    return [Device(0, "cpu", f"cpu ({os.cpu_count()} cores)", None)]


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
    residents: list[Any] = field(default_factory=list)


class LeaseManager:
    def __init__(self, devices: list[Device] | None = None) -> None:
        self.slots = [DeviceSlot(d) for d in (devices or discover_devices())]

    def add_resident(self, engine: Any, device_index: int = 0) -> None:
        self.slots[device_index].residents.append(engine)

    def _notify_positions(self, slot: DeviceSlot) -> None:
        for i, waiter in enumerate(slot.queue):
            if waiter.on_position:
                waiter.on_position(i + 1)

    @asynccontextmanager
    async def lease(
        self, owner: str, *, device_index: int = 0, on_position: Callable[[int | None], None] | None = None
    ) -> AsyncIterator[Device]:
        """Hold ``device_index`` exclusively for a trainer; queue (FIFO) while it is busy."""
        slot = self.slots[device_index]
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
        slept = await self._sleep_residents(slot)
        try:
            yield slot.device
        finally:
            with anyio.CancelScope(shield=True):
                await self._wake(slept)
                self._release(slot)

    def _release(self, slot: DeviceSlot) -> None:
        slot.holder = None
        if slot.queue:
            nxt = slot.queue.pop(0)
            slot.holder = nxt.owner
            nxt.granted.set()
            self._notify_positions(slot)

    async def _sleep_residents(self, slot: DeviceSlot) -> list[Any]:
        if slot.device.kind != "cuda":
            return []
        slept = []
        with anyio.CancelScope(shield=True), anyio.move_on_after(SLEEP_WAKE_TIMEOUT_S):
            for engine in slot.residents:
                await engine.sleep(1)
                slept.append(engine)
        return slept

    async def _wake(self, engines: list[Any]) -> None:
        with anyio.move_on_after(SLEEP_WAKE_TIMEOUT_S):
            for engine in engines:
                try:
                    await engine.wake_up()
                except Exception:
                    log.exception("engine did not wake up", engine=getattr(engine, "name", "?"))

    def statistics(self) -> list[dict[str, Any]]:
        return [{"device": s.device.name, "kind": s.device.kind, "holder": s.holder,
                 "queued": [w.owner for w in s.queue]} for s in self.slots]
