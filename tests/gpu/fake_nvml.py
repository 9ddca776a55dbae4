"""A fake NVML module: the GPU list and per-process memory NVML would report (the hardware
boundary that :func:`modelsmith.gpu.leases.discover_devices` reads)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class _Memory:
    total: int
    used: int = 0
    free: int = 0


@dataclass(frozen=True)
class _Process:
    pid: int
    usedGpuMemory: int | None


@dataclass
class FakeNvml:
    """``names`` of the GPUs; ``processes[index]`` the (pid, bytes) NVML lists on each."""

    names: list[str]
    total_bytes: int = 141 << 30
    processes: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    initialised: int = 0

    def nvmlInit(self) -> None:
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.names)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if not 0 <= index < len(self.names):
            raise ValueError("NVML_ERROR_INVALID_ARGUMENT")
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return self.names[handle].encode()  # older pynvml returns bytes

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> _Memory:
        return _Memory(total=self.total_bytes)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[_Process]:
        return [_Process(pid, used) for pid, used in self.processes.get(handle, [])]
