"""Learning-rate schedules: step (counted from 1) -> learning rate, computed on the host in float64 and
handed to the compiled update as a scalar input each step."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Constant:
    lr: float

    def __call__(self, step: int) -> float:
        return self.lr


@dataclass(frozen=True)
class Noam:
    """The paper's schedule (section 5.3): ``factor * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)``, a
    linear warm-up over ``warmup`` steps, then a decay with the inverse square root of the step."""
    d_model: int
    warmup: int = 4000
    factor: float = 1.0

    def __call__(self, step: int) -> float:
        return self.factor * self.d_model ** -0.5 * min(step ** -0.5, step * self.warmup ** -1.5)


@dataclass(frozen=True)
class WarmupCosine:
    """A linear warm-up to ``peak`` over ``warmup`` steps, then a cosine decay to ``floor`` at ``total``."""
    peak: float
    warmup: int
    total: int
    floor: float = 0.0

    def __call__(self, step: int) -> float:
        if step <= self.warmup:
            return self.peak * step / max(1, self.warmup)
        done = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + 0.5 * (self.peak - self.floor) * (1 + math.cos(math.pi * done))


#: the schedules ``attngraph train`` names (``--lr-schedule``)
SCHEDULES = ("noam", "cosine")


def as_schedule(lr) -> "Constant | Noam | WarmupCosine":
    """A schedule from a schedule, a callable (step -> lr) or a number (a constant rate)."""
    if callable(lr):
        return lr
    if isinstance(lr, (int, float)) and lr >= 0:
        return Constant(float(lr))
    raise ValueError(f"a learning rate is a non-negative number or a schedule (step -> rate), got {lr!r}")


__all__ = ["Constant", "Noam", "SCHEDULES", "WarmupCosine", "as_schedule"]
