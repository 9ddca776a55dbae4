"""What steers a training run in the child: the event stream on the real stdout, the plateau
detector, and the shared stop state (signal handler, reward function and callbacks)."""

from __future__ import annotations

import math
import os
import sys
from collections import deque
from dataclasses import dataclass, field

from modelsmith.gpu.trainer_spec import ConvergenceSpec, StopReason, TrainerEvent, encode_event

__all__ = ["EventWriter", "PlateauDetector", "StopState", "finite_or_none", "is_non_finite",
           "take_over_stdout"]


class EventWriter:
    """Writes events, one JSON line each, to the descriptor that was stdout at start."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def emit(self, event: TrainerEvent) -> None:
        data = memoryview(encode_event(event))
        while data:
            written = os.write(self._fd, data)
            data = data[written:]


def take_over_stdout() -> EventWriter:
    """Keep the real stdout for events; send whatever else prints to stdout to stderr."""
    sys.stdout.flush()
    event_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return EventWriter(event_fd)


@dataclass
class PlateauDetector:
    """Says when the reward's moving average has stopped rising.

    Every ``window`` observed rewards, the mean of the last ``window`` is compared with the best
    mean so far: above ``best + min_delta`` it is the new best, otherwise the window is stale.
    ``patience`` stale windows in a row, at step ``min_steps`` or later, is a plateau.
    """

    window: int
    min_delta: float
    patience: int
    min_steps: int
    best: float | None = None
    stale_windows: int = 0
    _recent: deque[float] = field(default_factory=deque)
    _observed: int = 0

    @classmethod
    def from_spec(cls, spec: ConvergenceSpec) -> PlateauDetector:
        return cls(
            window=spec.plateau_window,
            min_delta=spec.plateau_min_delta,
            patience=spec.plateau_patience,
            min_steps=spec.min_steps,
        )

    def observe(self, step: int, reward: float) -> bool:
        """Record the reward logged at ``step``; True when training has plateaued."""
        self._recent.append(reward)
        while len(self._recent) > self.window:
            self._recent.popleft()
        self._observed += 1
        if self._observed % self.window != 0:
            return False
        average = sum(self._recent) / len(self._recent)
        if self.best is None or average > self.best + self.min_delta:
            self.best = average
            self.stale_windows = 0
        else:
            self.stale_windows += 1
        return self.stale_windows >= self.patience and step >= self.min_steps


@dataclass
class StopState:
    """Why training stops, shared by the signal handler, the reward function and callbacks."""

    cancel_requested: bool = False
    reason: StopReason | None = None
    detail: str = ""
    non_finite_reward: str | None = None

    def stop(self, reason: StopReason, detail: str) -> None:
        if self.reason is None:  # the first cause wins; later ones are consequences
            self.reason = reason
            self.detail = detail


def finite_or_none(value: object) -> float | None:
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def is_non_finite(value: object) -> bool:
    return isinstance(value, int | float) and not math.isfinite(value)
