"""Parent selection: the first parent in proportion to the total score, the second by the
matchmaker (attraction) or again by total score.

Selection weights are never negative (a negative weight raises), empty slots get weight 0 and
are never sampled, and when every eligible weight is 0 the draw is uniform over the eligible
occupied slots instead of failing.
"""

from __future__ import annotations

import torch

from sparse_merge.evolution.scoring import competition_matrix


def sample_index(
    weights: torch.Tensor,
    valid: torch.Tensor,
    generator: torch.Generator,
    exclude: int | None = None,
) -> int:
    """One slot drawn with probability ∝ ``weights`` [pop] among ``valid`` slots (other than
    ``exclude``); uniform over them when their weights are all 0."""
    weights = weights.detach().double().cpu()
    if (weights < 0).any():
        raise ValueError(f"selection weights must be >= 0, got {weights.tolist()}")
    eligible = valid.bool().cpu().clone()
    if exclude is not None:
        eligible[exclude] = False
    if not eligible.any():
        raise ValueError("no occupied slot to sample from")
    w = weights * eligible
    if w.sum() <= 0:
        w = eligible.double()
    return int(torch.multinomial(w, 1, generator=generator))


def matchmaker_weights(
    scores: torch.Tensor,
    valid: torch.Tensor,
    first: int,
    alpha: float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """[pop] attraction of each slot to parent ``first``: ``sum_j max(0, f_kj - f_first,j)``
    with ``f_kj = c_j s_kj / z_j`` the competition shares (``weights``: the columns' ``c_j``);
    0 for empty slots and for ``first``."""
    f = competition_matrix(scores, alpha, valid, weights)  # [pop, D]
    w = (f - f[first]).clamp_min(0).sum(1) * valid.double()
    w[first] = 0.0
    return w


def select_parents(
    total: torch.Tensor,
    scores: torch.Tensor,
    valid: torch.Tensor,
    generator: torch.Generator,
    *,
    matchmaker: bool,
    alpha: float,
    weights: torch.Tensor | None = None,
) -> tuple[int, int]:
    """Two distinct parent slots (the same slot twice only when one slot is occupied). With
    ``matchmaker=False`` the reference draws both ∝ total with replacement; here the second
    is drawn among the other slots, so no evaluation is spent on a parent crossed with
    itself (docs/digits.md)."""
    first = sample_index(total, valid, generator)
    if int(valid.sum()) < 2:
        return first, first
    second = matchmaker_weights(scores, valid, first, alpha, weights) if matchmaker else total
    return first, sample_index(second, valid, generator, exclude=first)
