"""Linear merging (model soups): the weighted average of the models, as mergekit's ``linear``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sparse_merge.errors import check_choice
from sparse_merge.merging.base import MergeMethod, chunk_len, weighted_sum_


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

    def merge_into_(
        self,
        out: Tensor,
        base: Tensor | None,
        tensors: Sequence[Tensor],
        weights: Sequence[float],
        rng: torch.Generator | None = None,
    ) -> Tensor:
        """The weighted average of ``tensors`` (same shape, any number), written into ``out``.

        Traffic floor: one pass reading every model and writing ``out`` (``N + 1`` genomes),
        done by ``weighted_sum_``: for two models on the CPU one fused pass
        (``merging.kernels``), ~0.95 of the floor on one core of a 2-core EPYC in float32 and
        ~0.7 in bfloat16 (``make bench``); otherwise three torch ops per chunk (multiply, fused
        multiply-add, divide), ~0.6 in float32."""
        first = tensors[0]
        dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        w = torch.tensor([float(x) for x in weights], dtype=dtype)  # [N], rounded as mergekit
        divisor = None
        if self.normalize:
            divisor = float(w.sum())
            if divisor == 0.0:
                raise ValueError(f"linear: weights {list(weights)} sum to 0 (normalize=True)")
        flat = [t.view(-1) for t in tensors]  # [n] each
        acc = self.scratch("acc", (chunk_len(out.numel()),), dtype, out.device)
        weighted_sum_(out.view(-1), flat, w.tolist(), divisor, scratch=acc)
        return out
