"""Linear merging (model soups): the weighted average of the models, as mergekit's ``linear``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sparse_merge.errors import check_choice
from sparse_merge.merging.base import MergeMethod


class Linear(MergeMethod):
    """``sum_i w_i x_i / sum_i w_i`` per element, as mergekit 0.1.5's ``linear``.

    Args:
        normalize: divide by the sum of the weights (mergekit's default); ``False`` gives the
            plain weighted sum.

    Computed in float32 (float64 for float64 inputs) with the weights rounded to that dtype,
    and returned in the inputs' dtype, as mergekit does. The base model is ignored. Unlike
    mergekit (which returns inf/nan), weights summing to 0 with ``normalize`` raise an error.
    """

    name = "linear"

    def __init__(self, normalize: bool = True) -> None:
        self.normalize = bool(check_choice("normalize", normalize, (True, False)))

    def describe(self) -> dict[str, object]:
        """``linear`` and ``normalize``."""
        return {"name": self.name, "normalize": self.normalize}

    def merge_tensor(
        self,
        base: Tensor | None,
        tensors: Sequence[Tensor],
        weights: Sequence[float],
        rng: torch.Generator | None = None,
    ) -> Tensor:
        """The weighted average of ``tensors`` (same shape, any number)."""
        self.check_inputs(None, tensors, weights)
        first = tensors[0]
        dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        w = torch.tensor([float(x) for x in weights], dtype=dtype)  # [N], rounded as mergekit
        acc = first.to(dtype, copy=True).mul_(float(w[0]))  # same shape as the inputs
        for t, wi in zip(tensors[1:], w[1:].tolist()):
            acc.add_(t, alpha=wi)  # mixed dtypes promote to `dtype`: no upcast copy
        if self.normalize:
            total = float(w.sum())
            if total == 0.0:
                raise ValueError(f"linear: weights {list(weights)} sum to 0 (normalize=True)")
            acc.div_(total)
        return acc.to(first.dtype)
