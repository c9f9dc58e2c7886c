"""Which output rows of each linear layer to train: per-row importance and the row budget.

Per-weight importance scores [out, in] (magnitude, Wanda, Taylor, zeroth-order Taylor) are
summed over each output row; the ``k`` rows with the highest sums are trained (ties go to the
lower row index). ``random`` draws ``k`` rows from a seeded generator. The zeroth-order
gradients are SPSA estimates from ``n_estimate`` pairs of perturbed forward passes, with no
backward pass (as in MeZO): ``g ~ mean_i [(L(w + eps z_i) - L(w - eps z_i)) / (2 eps)] z_i``
with Gaussian ``z_i``. ``spsa_row_taylor`` runs the same estimator over one scale per row
instead of one value per weight, which estimates each row's Taylor sum ``sum_j W_rj dL/dW_rj``
directly and with much less noise (tiny Llama, attention layers: correlation 0.55 with the
true row sums from 128 pairs, 0.74 from 256; per-weight estimates summed per row: 0.17 from
256 pairs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from sparse_merge.errors import ConfigError


def rows_for_lora_rank(out_features: int, in_features: int, lora_rank: int) -> int:
    """Rows whose update has at most the trainable parameters of a rank-``r`` LoRA pair
    (``r * (in + out)``), at least 1 and at most ``out_features``."""
    return max(1, min(out_features, lora_rank * (in_features + out_features) // in_features))


def top_rows(row_scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [k] (ascending) of the ``k`` highest scores; ties go to the lower index."""
    if not 0 < k <= row_scores.numel():
        raise ConfigError("rank", k, f"between 1 and the layer's {row_scores.numel()} rows")
    order = torch.argsort(-row_scores.double(), stable=True)  # descending, stable
    return order[:k].sort().values


def random_rows(n_rows: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` distinct rows drawn uniformly with ``generator`` (ascending)."""
    return torch.randperm(n_rows, generator=generator)[:k].sort().values


def row_importance(weight_scores: torch.Tensor) -> torch.Tensor:
    """[out] sum of per-weight importance [out, in] over each output row."""
    return weight_scores.double().sum(1)


@torch.no_grad()
def spsa_gradients(
    params: Sequence[torch.Tensor],
    loss_fn: Callable[[], torch.Tensor],
    n_estimate: int,
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Zeroth-order (SPSA) estimates of ``d loss / d p`` for every ``p`` in ``params`` from
    ``2 * n_estimate`` forward passes; the parameters are restored exactly afterwards."""
    if n_estimate < 1:
        raise ConfigError("n_estimate", n_estimate, "an integer >= 1")
    originals = [p.detach().clone() for p in params]
    grads = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    try:
        for _ in range(n_estimate):
            zs = [torch.randn(p.shape, generator=generator).to(p) for p in params]
            for p, p0, z in zip(params, originals, zs):
                p.copy_(p0 + eps * z)
            plus = float(loss_fn())
            for p, p0, z in zip(params, originals, zs):
                p.copy_(p0 - eps * z)
            minus = float(loss_fn())
            scale = (plus - minus) / (2 * eps * n_estimate)
            for g, z in zip(grads, zs):
                g.add_(z.float(), alpha=scale)
    finally:
        for p, p0 in zip(params, originals):
            p.copy_(p0)
    return grads


def spsa_row_taylor(
    weights: Sequence[torch.Tensor],
    loss_fn: Callable[[], torch.Tensor],
    n_estimate: int,
    eps: float = 1e-2,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Zeroth-order estimates [out] of each row's Taylor sum ``sum_j W_rj dL/dW_rj`` for every
    weight [out, in] in ``weights``, from ``2 * n_estimate`` forward passes.

    The sum is the derivative of the loss with respect to a scale ``s_r`` of row ``r``
    (``W_r <- s_r W_r``) at ``s = 1``, so SPSA runs over one scale per row (relative
    perturbations ``1 + eps z_r``) instead of one value per weight: far fewer unknowns, hence a
    far less noisy estimate from the same forward passes. The weights are restored exactly.
    """
    originals = [w.detach().clone() for w in weights]
    scales = [torch.ones(w.shape[0], device=w.device) for w in weights]  # [out] each

    def scaled_loss() -> torch.Tensor:
        for w, w0, s in zip(weights, originals, scales):
            w.copy_(w0 * s[:, None].to(w0.dtype))
        return loss_fn()

    try:
        return spsa_gradients(scales, scaled_loss, n_estimate, eps, generator)
    finally:
        with torch.no_grad():
            for w, w0 in zip(weights, originals):
                w.copy_(w0)
