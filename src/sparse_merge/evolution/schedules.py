"""Sparsity schedules: the pruning target at each evolution step.

``CyclicSchedule`` is a cosine ramp with warm restarts that really spans ``[low, high]``: the
first step of every cycle is exactly ``low`` and the last step exactly ``high``, then the next
cycle restarts at ``low``. Cycle ``i`` lasts ``round(period * mult**i)`` steps (``mult=1``:
equal cycles, ``mult=2``: each cycle twice as long, as in SGDR). A schedule is a pure function
of the step, so its phase is the step counter the evolver checkpoints.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

from sparse_merge.errors import ConfigError, check_fraction


@runtime_checkable
class Schedule(Protocol):
    """The pruning sparsity at step ``step`` (0-based)."""

    def __call__(self, step: int) -> float: ...


class ConstantSchedule:
    """The same sparsity every step (``None``: the run's target ``sparsity``)."""

    def __init__(self, value: float | None = None) -> None:
        self.value = None if value is None else check_fraction("value", value)

    def __call__(self, step: int) -> float:
        """``value`` whatever the step."""
        if self.value is None:
            raise ValueError("ConstantSchedule(value=None) must be bound to the run's target")
        return self.value

    def bind(self, target: float) -> ConstantSchedule:
        """This schedule with ``None`` replaced by the run's target sparsity."""
        return self if self.value is not None else ConstantSchedule(target)

    def values(self, steps: int) -> list[float]:
        """The distinct sparsities of the first ``steps`` steps (``[value]``, or none)."""
        return [self(0)] if steps > 0 else []

    def __repr__(self) -> str:
        return f"ConstantSchedule(value={self.value})"


class CyclicSchedule:
    """Cosine ramps from ``low`` to ``high`` with warm restarts (see module docstring);
    ``high=None`` is the run's target ``sparsity``."""

    def __init__(
        self, low: float = 0.0, high: float | None = None, period: int = 10, mult: float = 1.0
    ) -> None:
        self.low = check_fraction("low", low)
        self.high = None if high is None else check_fraction("high", high)
        if self.high is not None and self.high < self.low:
            raise ConfigError("high", high, f"a value >= low ({low})")
        if int(period) < 1:
            raise ConfigError("period", period, "an integer >= 1 (steps per cycle)")
        if mult < 1:
            raise ConfigError("mult", mult, "a number >= 1 (cycle length multiplier)")
        self.period, self.mult = int(period), float(mult)

    def bind(self, target: float) -> CyclicSchedule:
        """This schedule with ``high=None`` replaced by the run's target sparsity."""
        if self.high is not None:
            return self
        if target > 0 and self.low > target:  # a ramp down was never meant: say so
            raise ConfigError(
                "evolver.schedule.low",
                self.low,
                f"<= the run's sparsity ({target}) when high is null",
            )
        return CyclicSchedule(min(self.low, target), target, self.period, self.mult)

    def phase(self, step: int) -> tuple[int, int]:
        """(position within its cycle, cycle length) of ``step``."""
        length, start = self.period, 0
        cycle = 0
        while step >= start + length:
            start += length
            cycle += 1
            length = max(1, round(self.period * self.mult**cycle))
        return step - start, length

    def __call__(self, step: int) -> float:
        """``low + (high - low) * (1 - cos(pi * t / (T - 1))) / 2`` at position t of a T-step cycle."""
        if self.high is None:
            raise ValueError("CyclicSchedule(high=None) must be bound to the run's target")
        return self._at(*self.phase(step))

    def _at(self, t: int, length: int) -> float:
        """The sparsity at position ``t`` of a ``length``-step cycle (bound schedules only)."""
        assert self.high is not None
        frac = 1.0 if length == 1 else t / (length - 1)
        value = self.low + (self.high - self.low) * (1.0 - math.cos(math.pi * frac)) / 2.0
        return min(max(value, self.low), self.high)

    def values(self, steps: int) -> list[float]:
        """The distinct sparsities of the first ``steps`` steps, in order of first appearance
        (cycle by cycle, so a long run costs one pass over its cycles' positions)."""
        if self.high is None:
            raise ValueError("CyclicSchedule(high=None) must be bound to the run's target")
        seen: dict[float, None] = {}
        done: set[tuple[int, int]] = set()  # (cycle length, positions reached) already listed
        start, cycle, length = 0, 0, self.period
        while start < steps:
            reached = min(length, steps - start)
            if (length, reached) not in done:
                done.add((length, reached))
                for t in range(reached):
                    seen.setdefault(self._at(t, length), None)
            start += length
            cycle += 1
            length = max(1, round(self.period * self.mult**cycle))
        return list(seen)

    def __repr__(self) -> str:
        return (
            f"CyclicSchedule(low={self.low}, high={self.high}, period={self.period}, "
            f"mult={self.mult})"
        )


def schedule_values(schedule: Any, target: float, steps: int, cap: int = 100_000) -> list[float]:
    """The distinct sparsities ``schedule`` (bound to the run's ``target`` when it has
    ``bind``) gives over ``steps`` steps, in order of first appearance. A schedule without
    ``values`` is called step by step, up to ``cap`` steps."""
    if hasattr(schedule, "bind"):
        schedule = schedule.bind(target)
    if hasattr(schedule, "values"):
        return [float(v) for v in schedule.values(int(steps))]
    return list(dict.fromkeys(float(schedule(step)) for step in range(min(int(steps), cap))))
