"""What a training-throughput measurement (``pipeline: throughput``) counts, and how.

Plain Python with no heavy imports: ``config.Config`` uses ``ThroughputSettings`` as the schema
of the ``throughput`` key, and the pipeline builds it before any model loads.

- **Time**: the trainer's own loop runs ``warmup_steps + steps`` optimiser steps (encode the
  batch, forward, backward, gradient clipping, AdamW step; the sparse-to-sparse forward applies
  the mask to the effective weight every step). ``StepClock`` is the trainer's logger, called
  after every step once the step's loss has been synchronised (``finetune.log_every=1``), so
  the time between two calls is one whole step. Only the last ``steps`` steps are timed: the
  warm-up steps allocate the optimiser state and warm the allocator, thread pools and kernels.
- **Memory**, over the timed steps too (so one-time allocations of the first job of a process
  do not count): on CUDA ``torch.cuda.max_memory_allocated`` (weights included); on CPU the
  peak resident set size above the level at the end of the warm-up, ``PeakRss``. That reads
  Linux's per-process high-water mark (``VmHWM``) after resetting it to the current resident
  size (``/proc/self/clear_refs``), so the peak is the timed steps' own even when earlier jobs
  of a Hydra multirun ran in the same process (``ru_maxrss`` would keep their peak). Freed
  heap memory is handed back to the system first (``malloc_trim``), so the steps' allocations
  show up as resident growth instead of reusing pages left behind. The CPU figure is what a
  step adds on top of what persists between steps (weights, adapters, optimiser state):
  activations, gradients and temporaries.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparse_merge.errors import check_int

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class ThroughputSettings:
    """Steps of a throughput measurement (the ``throughput`` config key)."""

    warmup_steps: int = 5  # untimed optimiser steps first (optimiser state, allocator, kernels)
    steps: int = 50  # timed optimiser steps after the warm-up

    def __post_init__(self) -> None:
        check_int("throughput.warmup_steps", self.warmup_steps, minimum=1)
        check_int("throughput.steps", self.steps, minimum=1)


class StepClock:
    """A trainer logger that passes each record on to ``inner`` (the run's logger, when given),
    calls ``on_step(steps done)`` and then timestamps the end of the step, last, so neither
    counts in the next step's time."""

    def __init__(
        self, inner: Any | None = None, on_step: Callable[[int], None] | None = None
    ) -> None:
        self.inner = inner
        self.on_step = on_step
        self.ends: list[float] = []  # perf_counter() after each step, in order

    def log(
        self, metrics: Mapping[str, Any], step: int | None = None, console: bool = False
    ) -> None:
        """Log ``metrics`` to the inner logger, run the hook, record the time."""
        if self.inner is not None:
            self.inner.log(metrics, step=step, console=console)
        if self.on_step is not None:
            self.on_step(len(self.ends) + 1 if step is None else step)
        self.ends.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        """Wall time of every step after the first (the first has no start mark)."""
        return [b - a for a, b in zip(self.ends, self.ends[1:])]


def _status_mb(key: str) -> float | None:
    """A ``kB`` field of ``/proc/self/status`` in MiB; None where there is no such file."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _trim_heap() -> None:
    """Return freed heap pages to the system (glibc ``malloc_trim``; a no-op elsewhere)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
    if trim is not None:
        trim(0)


class PeakRss:
    """Peak resident memory of this process between ``start()`` and ``stop()`` above its
    resident memory at ``start()`` (``delta_mb``, MiB); None where Linux's counters are
    unavailable. Also a context manager."""

    def __init__(self) -> None:
        self.start_mb: float | None = None
        self.peak_mb: float | None = None

    def start(self) -> None:
        """Hand freed heap pages back, then reset the high-water mark to the current RSS."""
        _trim_heap()
        self.start_mb = self.peak_mb = None
        try:
            _CLEAR_REFS.write_text("5")  # VmHWM := current VmRSS
        except OSError:
            return  # no reset: the high-water mark could be an earlier job's
        self.start_mb = _status_mb("VmRSS")

    def stop(self) -> None:
        """Read the high-water mark since ``start()``."""
        if self.start_mb is not None:
            self.peak_mb = _status_mb("VmHWM")

    def __enter__(self) -> PeakRss:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def delta_mb(self) -> float | None:
        """Peak since ``start()`` minus the level at ``start()`` (MiB)."""
        if self.start_mb is None or self.peak_mb is None:
            return None
        return max(0.0, self.peak_mb - self.start_mb)


@dataclass
class Throughput:
    """One measurement: what the timed steps processed and how long they took."""

    batch_size: int  # examples per process per micro-batch
    warmup_steps: int
    steps: int  # timed optimiser steps
    samples: int  # examples of the timed steps, all processes
    tokens: int  # non-padding tokens of the timed steps, all processes
    step_seconds: list[float] = field(default_factory=list)  # wall time of each timed step
    peak_memory_mb: float | None = None
    memory_measure: str = "none"  # cuda_max_allocated | cpu_peak_rss_delta | none

    @property
    def seconds(self) -> float:
        """Wall time of the timed steps."""
        return sum(self.step_seconds)

    @property
    def samples_per_s(self) -> float:
        """Training examples per second."""
        return self.samples / self.seconds

    @property
    def tokens_per_sample(self) -> float:
        """Mean non-padding tokens per example of the timed steps."""
        return self.tokens / self.samples

    @property
    def tokens_per_s(self) -> float:
        """Non-padding tokens per second: ``samples_per_s * tokens_per_sample``."""
        return self.samples_per_s * self.tokens_per_sample

    @property
    def samples_per_s_median(self) -> float:
        """Examples per second at the median step time: robust to the steps another process
        slowed down on a shared machine (every step draws the same number of examples)."""
        return self.samples / (statistics.median(self.step_seconds) * self.steps)

    def metrics(self) -> dict[str, Any]:
        """Flat values for ``results.json`` and the run summary."""
        return {
            "batch_size": self.batch_size,
            "warmup_steps": self.warmup_steps,
            "timed_steps": self.steps,
            "samples": self.samples,
            "tokens": self.tokens,
            "tokens_per_sample": self.tokens_per_sample,
            "seconds": self.seconds,
            "samples_per_s": self.samples_per_s,
            "tokens_per_s": self.tokens_per_s,
            "throughput": self.samples_per_s,  # the sweep analysis' standard name
            "samples_per_s_median": self.samples_per_s_median,
            "tokens_per_s_median": self.samples_per_s_median * self.tokens_per_sample,
            "step_time_s": self.seconds / self.steps,
            "step_time_median_s": statistics.median(self.step_seconds),
            "step_time_min_s": min(self.step_seconds),
            "peak_memory_mb": self.peak_memory_mb,
            "memory_measure": self.memory_measure,
        }
