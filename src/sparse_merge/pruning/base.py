"""The Pruner protocol, calibration data and masks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from sparse_merge.errors import ConfigError
from sparse_merge.pruning.settings import CalibrationSettings
from sparse_merge.tasks.base import Example

# Masks: weight parameter name -> bool tensor in the weight's own layout, True = kept.
Masks = dict[str, torch.Tensor]


@dataclass
class Calibration:
    """Token sequences whose activations calibrate activation-aware pruners (Wanda, SparseGPT)."""

    input_ids: torch.Tensor  # [N, T]
    attention_mask: torch.Tensor  # [N, T]
    labels: torch.Tensor | None = None  # [N, T] loss targets for gradient scores (-100 = skip)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def loss_labels(self) -> torch.Tensor:
        """[N, T] targets of the LM loss: ``labels``, else every non-padding token."""
        if self.labels is not None:
            return self.labels
        return self.input_ids.masked_fill(self.attention_mask == 0, -100)

    def head(self, n: int) -> Calibration:
        """The first ``n`` sequences (all of them when there are fewer)."""
        labels = None if self.labels is None else self.labels[:n]
        return Calibration(self.input_ids[:n], self.attention_mask[:n], labels)

    @classmethod
    def from_examples(
        cls,
        tokenizer: PreTrainedTokenizerBase,
        examples: Sequence[Example],
        max_length: int = 128,
        answers_only: bool = False,
    ) -> Calibration:
        """Prompt + answer of each example, right-padded (padding is masked out); with
        ``answers_only`` the gradient loss covers the answer tokens only (labels)."""
        side = tokenizer.padding_side
        tokenizer.padding_side = "right"
        try:
            batch = tokenizer(
                [e.prompt + e.answer for e in examples],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
                add_special_tokens=False,
            )
        finally:
            tokenizer.padding_side = side
        labels = None
        if answers_only:
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            for i, e in enumerate(examples):
                n_prompt = len(tokenizer(e.prompt, add_special_tokens=False)["input_ids"])
                labels[i, :n_prompt] = -100
        return cls(batch["input_ids"], batch["attention_mask"], labels)

    @classmethod
    def from_tasks(
        cls,
        tokenizer: PreTrainedTokenizerBase,
        tasks,
        n: int,
        seed: int,
        max_length: int = 128,
        answers_only: bool = False,
    ) -> Calibration:
        """``n`` training examples of a task suite (``names``, ``train_examples``), interleaved
        over its tasks — never from the selection or held-out splits. A dataset task with fewer
        training rows than its share raises ``ConfigError`` (rows are never repeated)."""
        per_task = -(-n // len(tasks.names))
        for name, task in tasks.tasks.items():
            pool = getattr(task, "pool", None)  # dataset tasks: the never-evaluated rows
            available = len(pool()) if pool is not None else per_task
            if available < per_task:
                raise ConfigError(
                    "calibration.n",
                    n,
                    f"at most {available * len(tasks.names)}: task {name} has "
                    f"{available} training rows outside its held-out and selection subsets "
                    f"and {per_task} are needed (more data, or smaller n_select/n_heldout)",
                )
        examples = tasks.train_examples(per_task, seed)[:n]
        return cls.from_examples(tokenizer, examples, max_length, answers_only)

    @classmethod
    def from_settings(
        cls, tokenizer: PreTrainedTokenizerBase, tasks, settings, run_seed: int
    ) -> Calibration:
        """The calibration set a ``CalibrationSettings`` describes (None: the defaults)."""
        settings = CalibrationSettings() if settings is None else settings
        seed = run_seed if settings.seed is None else settings.seed
        return cls.from_tasks(
            tokenizer, tasks, settings.n, seed, settings.length, settings.answer_loss
        )

    def batches(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(input_ids [b, T], attention_mask [b, T]) chunks."""
        return [
            (self.input_ids[i : i + batch_size], self.attention_mask[i : i + batch_size])
            for i in range(0, len(self), batch_size)
        ]


@runtime_checkable
class Pruner(Protocol):
    """Zeroes weights of the prunable layers in place and returns the masks it applied.

    A pruner that can prune to a fixed set of sparsities only (an N:M pattern) says so with
    ``accepted_sparsities() -> tuple[float, ...] | None`` (see ``accepted_sparsities``), so
    that a run whose target or schedule asks for others is refused before any model loads.
    """

    def prune(self, model: nn.Module, calib: Calibration | None, sparsity: float) -> Masks:
        """Prune ``model`` to ``sparsity`` (fraction of prunable weights set to exactly zero)."""
        ...


SPARSITY_TOLERANCE = 1e-6  # how close a sparsity must be to one of a fixed set to be it


def accepted_sparsities(pruner: Pruner | None) -> tuple[float, ...] | None:
    """The sparsities ``pruner`` can prune to: a fixed set (an N:M pattern: 0 and (M-N)/M), or
    ``None`` for any fraction in [0, 1). A pruner declares a fixed set with an
    ``accepted_sparsities()`` method; one without it accepts any fraction."""
    method = getattr(pruner, "accepted_sparsities", None)
    return None if method is None else method()


def sparsity_accepted(allowed: tuple[float, ...] | None, sparsity: float) -> bool:
    """Whether ``sparsity`` is one of ``allowed`` (``None``: any fraction is)."""
    return allowed is None or any(abs(sparsity - a) <= SPARSITY_TOLERANCE for a in allowed)


def prune_in_place(
    pruner: Pruner, model: nn.Module, calib: Calibration | None, sparsity: float
) -> None:
    """Prune ``model`` in place without keeping the keep-masks: a pruner that can drop each
    layer's mask once applied says so with ``prune_(model, calib, sparsity)`` (the pruners
    here, ``masking.LayerMasks``); another's masks are dropped after ``prune``."""
    in_place = getattr(pruner, "prune_", None)
    if in_place is None:
        pruner.prune(model, calib, sparsity)
    else:
        in_place(model, calib, sparsity)


def ranks_globally(pruner: Pruner) -> bool:
    """Whether ``pruner`` ranks every layer together (a score pruner's ``ranks_globally``;
    a pruner without that property does not)."""
    return bool(getattr(pruner, "ranks_globally", False))


def holds_every_mask(pruner: Pruner) -> bool:
    """Whether ``prune_in_place`` still holds every layer's keep-mask at once: the pruner has
    no ``prune_``, or it ranks every layer together (``ranks_globally``) and so makes every
    mask before applying one."""
    return not hasattr(pruner, "prune_") or ranks_globally(pruner)


def uses_calibration(pruner: Pruner | None) -> bool:
    """Whether ``pruner`` needs calibration data (a pruner says so with ``uses_calibration``;
    one that does not say is given them)."""
    return pruner is not None and bool(getattr(pruner, "uses_calibration", True))


def sequences_read(pruner: Pruner | None, n: int) -> int:
    """How many of ``n`` calibration sequences ``pruner`` reads: Wanda's and SparseGPT's
    ``n_calibration``, a gradient score's ``n_batches * batch_size`` (32 by default, whatever
    ``calibration.n``), at most ``n``; 0 for a pruner that reads none."""
    if not uses_calibration(pruner):
        return 0
    limit = getattr(pruner, "n_calibration", None)
    importance = getattr(pruner, "importance", None)
    if hasattr(importance, "n_batches"):
        limit = importance.n_batches * importance.batch_size
    return n if limit is None else min(n, int(limit))


SORT_ROWS = 1 << 16  # rows up to this long are sorted to find their thresholds, longer selected


def keep_smallest_out(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Bool keep-mask with exactly ``n_prune`` False entries at the lowest ``scores`` along the
    last dim; ties go to the lower index (as a stable sort would), so the count never drifts.

    On the CPU the ``n_prune``-th smallest score of each row is the threshold, found with NumPy
    (``_thresholds``: ten to forty times faster here than torch's ``kthvalue`` or a stable
    argsort); everything below it goes, and of the entries equal to it the lowest-index ones
    go until the count is exact (only rows where equal entries straddle the cut need that
    count). This is the mask of a stable argsort, bit for bit; sorting was most of in-loop
    pruning's time. Other devices sort (fast there). Scores must not be NaN.
    """
    n = scores.shape[-1] if scores.dim() else 1
    if n_prune <= 0 or scores.numel() == 0:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if n_prune >= n:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if scores.device.type != "cpu":
        order = torch.argsort(scores, dim=-1, stable=True)  # ascending
        keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
        return keep.scatter_(-1, order[..., :n_prune], False)
    keep = torch.empty(scores.shape, dtype=torch.bool)  # contiguous; every entry set below
    exact = scores.detach()
    if exact.dtype not in (torch.float32, torch.float64, torch.float16):
        exact = exact.float()  # bf16 and integers: float32 holds them exactly, same order
    exact, rows_keep = exact.reshape(-1, n).contiguous(), keep.view(-1, n)
    values = exact.numpy()
    cut, crossing = _thresholds(values, n_prune)  # [R, 1], [R]
    # where no entry after the cut equals the threshold, exactly the entries <= it go: one
    # comparison, no counting
    torch.gt(exact, torch.from_numpy(cut), out=rows_keep)
    if crossing.any():  # ties straddle the cut (e.g. the zeros of an already pruned weight)
        # in those rows the first ``room`` tied entries go and the rest stay; a torch cumsum
        # over every entry (int64) had cost 12x the selection on a bfloat16 layer's 14 M
        # magnitudes, whose ties are few but in every row
        kept = rows_keep.numpy()
        tied = values == cut  # [R, n]
        tied[~crossing] = False  # elsewhere every tied entry goes: kept is already right
        ties = np.count_nonzero(tied, axis=-1)  # [R]
        room = n_prune - (n - np.count_nonzero(kept, axis=-1) - ties)  # ties that still go
        if 8 * int(ties.sum()) > tied.size:  # many (a pruned weight's zeros): a running count
            count = np.cumsum(tied, axis=-1, dtype=np.int32 if n < 2**31 else np.int64)
            kept |= tied & (count > room[:, None])
        else:  # few: from their places, row by row in index order
            r, c = np.divmod(np.flatnonzero(tied), n)
            stay = np.arange(r.size) - (np.cumsum(ties) - ties)[r] >= room[r]  # 0-based rank
            kept[r[stay], c[stay]] = True
    return keep


def _thresholds(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k``-th smallest entry (1-based, ``0 < k < n``) of every row of ``values`` [R, n]
    as [R, 1], and [R] whether another entry equal to it comes after it in sorted order (ties
    straddle the cut).

    Rows up to ``SORT_ROWS`` long are sorted (numpy's SIMD sort): as fast as its selection on
    distinct scores, and 5-7x faster where many are equal, as the zeros of an already pruned
    weight, on which numpy's selection slows down as much. Longer rows (one row per layer) are
    selected (``np.partition``, linear); where many entries equal the row's minimum (zeros
    again), among the others."""
    n = values.shape[-1]
    if n <= SORT_ROWS:
        ordered = np.sort(values, axis=-1)
        return ordered[:, k - 1 : k], ordered[:, k] == ordered[:, k - 1]
    cut, crossing = np.empty((len(values), 1), values.dtype), np.empty(len(values), bool)
    for i, row in enumerate(values):
        cut[i], crossing[i] = _row_threshold(row, k)
    return cut, crossing


def _row_threshold(row: np.ndarray, k: int) -> tuple[float, bool]:
    """``_thresholds`` of one long row [n]: ``np.partition``, or where a strided sample says
    many entries equal the row's minimum, the minimum itself or a partition of the others."""
    sample = row[:: max(1, row.size // 4096)]
    if 8 * np.count_nonzero(sample == sample.min()) > sample.size:
        low = row.min()
        at_low = np.count_nonzero(row == low)
        if at_low >= k:
            return low, at_low > k
        if 8 * at_low > row.size:
            row, k = row[row != low], k - at_low  # the k-th of the others; ties are among them
    part = np.partition(row, k - 1)
    return part[k - 1], part[k:].min() == part[k - 1]
