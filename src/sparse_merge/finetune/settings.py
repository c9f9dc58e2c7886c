"""Settings of the fine-tuning pipeline and its trainer (the ``finetune`` config key).

A plain dataclass with no heavy imports: ``config.Config`` uses it as the schema of the
``finetune`` key (a mistyped key fails at compose time) and the pipeline builds it from the
composed values, which runs the range checks below before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparse_merge.errors import ConfigError, check_choice, check_fraction, check_positive

PRECISIONS = ("auto", "no", "bf16", "fp16")


@dataclass
class FinetuneSettings:
    """What to fine-tune and how: optimiser, batches, precision, checkpoints."""

    start: str = "base"  # model to fine-tune: the source's base, or one of its parents by name
    steps: int = 300  # optimiser steps
    batch_size: int = 32  # examples per process per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 2e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW weight decay
    warmup: float = 0.1  # fraction of the steps with a linear warm-up, then cosine decay to 0
    max_grad_norm: float = 1.0  # gradient clipping (0: off)
    max_length: int = 128  # tokens per example (prompt + answer), longer ones are cut
    n_train: int = 0  # training examples per task (0: as many as the steps consume, no repeats)
    mixed_precision: str = "auto"  # auto (bf16 on a CUDA device that has it), no, bf16, fp16
    log_every: int = 10  # steps between logged training losses
    checkpoint_every: int = 100  # steps between checkpoints (0: none); a resumed run continues

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "grad_accum", "max_length", "log_every"):
            check_positive(f"finetune.{key}", getattr(self, key))
        for key in ("n_train", "checkpoint_every", "max_grad_norm", "weight_decay"):
            check_positive(f"finetune.{key}", getattr(self, key), allow_zero=True)
        check_positive("finetune.lr", self.lr)
        check_fraction("finetune.warmup", self.warmup)
        check_choice("finetune.mixed_precision", self.mixed_precision, PRECISIONS)
        if not self.start:
            raise ConfigError("finetune.start", self.start, "'base' or a parent's name")

    @property
    def examples_per_step(self) -> int:
        """Examples one process consumes per optimiser step."""
        return self.batch_size * self.grad_accum
