"""Learning-rate schedules for ``scheduler_config`` (multipliers of the base learning rate, per optimizer step)."""
from __future__ import annotations


class LinearWarmUp:
    """Multiplier rising linearly from ``f_start`` to 1 over ``warm_up_steps`` optimizer steps, then constant."""

    def __init__(self, warm_up_steps: int, f_start: float = 0.0):
        if warm_up_steps < 0 or not 0.0 <= f_start <= 1.0:
            raise ValueError(f"LinearWarmUp: need warm_up_steps >= 0 and 0 <= f_start <= 1, got {warm_up_steps}, "
                             f"{f_start}")
        self.warm_up_steps, self.f_start = warm_up_steps, f_start

    def __call__(self, step: int) -> float:
        if step >= self.warm_up_steps:
            return 1.0
        return self.f_start + (1.0 - self.f_start) * step / self.warm_up_steps
