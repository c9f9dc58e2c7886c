"""Device and dtype chosen in one place (``hardware=cpu`` / ``hardware=gpu``)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from sparse_merge.errors import ConfigError, check_choice

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MEMORY_CHECKS = ("refuse", "warn")


@dataclass
class Hardware:
    """Where models live and in which dtype; ``dtype='auto'`` picks bf16 on CUDA when supported.

    ``memory_check``: what a merge does when its memory plan says the run will not fit
    (``evolution.memory``): ``refuse`` (stop before loading a model, naming the setting to
    change) or ``warn`` (log the same message and run anyway: the plan is an upper bound, up
    to ~20 % above the measured peaks in ``docs/scale.md``, and it cannot see swap)."""

    device: str = "cpu"
    dtype: str = "float32"
    num_threads: int = 0  # 0 leaves torch's default
    memory_check: str = "refuse"

    def __post_init__(self) -> None:
        if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", self.device):
            raise ConfigError("device", self.device, "cpu, cuda, cuda:N or mps")
        check_choice("dtype", self.dtype, [*DTYPES, "auto"])
        check_choice("memory_check", self.memory_check, MEMORY_CHECKS)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(
                "device", self.device, "cpu here: CUDA is not available on this machine"
            )
        if self.device == "mps" and not torch.backends.mps.is_available():
            raise ConfigError(
                "device", self.device, "cpu here: MPS is not available on this machine"
            )
        if isinstance(self.num_threads, bool) or not isinstance(self.num_threads, int):
            raise ConfigError(
                "num_threads", self.num_threads, "a whole number >= 0 (0: torch's default)"
            )
        if self.num_threads < 0:
            raise ConfigError(
                "num_threads", self.num_threads, "a whole number >= 0 (0: torch's default)"
            )
        if self.num_threads > 0:
            torch.set_num_threads(self.num_threads)

    @property
    def torch_device(self) -> torch.device:
        """The ``torch.device``."""
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The model dtype; ``auto`` is bf16 on a CUDA device that supports it, else fp32."""
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if self.device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32


@contextmanager
def pinned_threads(num_threads: int) -> Iterator[None]:
    """torch's CPU ops (and its BLAS) on ``num_threads`` intra-op threads inside the block,
    whatever the caller set (``hardware.num_threads``); the caller's count comes back after.
    For results that must not depend on the thread count: MKL, for one, splits a dot product
    between its threads, so its last bits change with their number."""
    threads = torch.get_num_threads()
    if threads == num_threads:
        yield
        return
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
