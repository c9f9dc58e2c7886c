"""Archive scores -> selection weights: competition fitness and the sparsity-aware total score.

``total = omega * fitness_norm + beta * sparsity_score``, with both terms on the same bounded
scale and never negative, so they can be used directly as selection weights:

* ``kind='softmax'`` (as in the sparsity-aware evolution paper): the sparsity score is
  ``softmax(sparsity / tau)`` over the occupied slots, and fitness is normalised to sum to 1
  over the occupied slots, so both terms are distributions over the archive.
* ``kind='fraction'``: the sparsity score is the raw fraction of zero prunable weights in
  [0, 1] and fitness is divided by its maximum, so both lie in [0, 1] (scale-stable: it does
  not depend on the population size or on ``tau``).
* ``kind='rank'``: both terms are ranks scaled to [0, 1] (ties share their mean rank).

Empty slots (``valid=False``) get weight 0 and never take part in the normalisations.

The sparsity the scorer sees is measured by the problem with the scorer's ``epsilon``: a
prunable weight counts as zero when ``|w| <= epsilon`` (0, the default: exact zeros only). The
threshold only shapes selection; reported sparsity is always the exact zero count.
"""

from __future__ import annotations

import copy

import torch

from sparse_merge.errors import ConfigError, check_choice, check_positive, is_number

KINDS = ("softmax", "fraction", "rank")


def check_epsilon(key: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite number >= 0 (a near-zero threshold)."""
    if not is_number(value, finite=True) or value < 0:
        raise ConfigError(key, value, "a finite number >= 0 (0.0: only exact zeros count)")
    return float(value)


def competition_matrix(
    scores: torch.Tensor,
    alpha: float,
    valid: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """[pop, D] per-datapoint shares ``c_j s_ij / z_j`` with ``z_j = (sum_i s_ij)^alpha``.

    ``scores`` is [pop, D] and non-negative; a column nobody solves has ``z_j = 1`` (0 -> 1).
    ``alpha=0`` turns competition off (``z_j = 1``). Rows with ``valid=False`` are ignored
    (they do not count in ``z``) and get 0. ``weights``: the columns' weights ``c_j`` [D]
    (mean 1; None: all 1), applied to the shares: scaling the scores instead would cancel in
    ``s / z`` at ``alpha = 1``.
    """
    valid = torch.ones(scores.shape[0], dtype=torch.bool) if valid is None else valid.bool()
    s = scores.double() * valid[:, None].to(scores.device)  # [pop, D]
    z = s.sum(0).pow(alpha)  # [D]
    z = torch.where(z == 0, torch.ones_like(z), z)
    shares = s / z
    return shares if weights is None else shares * weights.to(shares.device)


def competition_fitness(
    scores: torch.Tensor,
    alpha: float,
    valid: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Natural Niches fitness ``f_i = sum_j c_j s_ij / z_j`` (see ``competition_matrix``);
    [pop]."""
    return competition_matrix(scores, alpha, valid, weights).sum(1)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks in [0, 1] (0 = lowest); a single element gets 1."""
    n = x.numel()
    if n == 1:
        return torch.ones_like(x)
    less = (x[:, None] > x[None, :]).sum(1).double()
    equal = (x[:, None] == x[None, :]).sum(1).double()
    return (less + (equal - 1) / 2) / (n - 1)


class SparsityAwareScorer:
    """Selection weights ``omega * fitness + beta * sparsity_score`` (see module docstring).

    Args:
        omega: weight of the (normalised) competition fitness.
        beta: weight of the sparsity score (0: the fitness-only scorer of plain Natural Niches).
        tau: softmax temperature of the sparsity score (``kind='softmax'``).
        alpha: competition exponent of the fitness (0: no competition, the GA).
        kind: how both terms are put on one scale: ``softmax``, ``fraction`` or ``rank``.
        epsilon: near-zero threshold of the sparsity the scorer sees: a prunable weight with
            ``|w| <= epsilon`` counts as zero (compared in the genome's dtype). 0.0 (the
            default): exact zeros. Reported sparsity stays the exact zero count.
    """

    def __init__(
        self,
        omega: float = 1.0,
        beta: float = 0.0,
        tau: float = 0.1,
        alpha: float = 1.0,
        kind: str = "softmax",
        epsilon: float = 0.0,
    ) -> None:
        check_positive("omega", omega, allow_zero=True)
        check_positive("beta", beta, allow_zero=True)
        if omega + beta <= 0:
            raise ConfigError("beta", beta, f"omega + beta > 0 (omega={omega})")
        self.omega, self.beta = float(omega), float(beta)
        self.tau = float(check_positive("tau", tau))
        self.alpha = float(check_positive("alpha", alpha, allow_zero=True))
        self.kind = check_choice("kind", kind, KINDS)
        self.epsilon = check_epsilon("epsilon", epsilon)
        self.column_weights: torch.Tensor | None = None  # [D] (mean 1; None: all 1)

    def weighing(self, column_weights: torch.Tensor | None) -> SparsityAwareScorer:
        """This scorer for a problem whose selection columns weigh ``column_weights`` [D]
        (``TaskSuite.selection_weights``; None: all 1): a copy, this one unchanged."""
        out = copy.copy(self)
        out.column_weights = column_weights
        return out

    def fitness(self, scores: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """[pop] competition fitness (raw, before normalisation)."""
        return competition_fitness(scores, self.alpha, valid, self.column_weights)

    def sparsity_score(self, sparsity: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[pop] bounded sparsity score in [0, 1]; 0 on empty slots."""
        out = torch.zeros(sparsity.shape, dtype=torch.float64)
        if not valid.any():
            return out
        s = sparsity.double()[valid]
        if self.kind == "softmax":
            out[valid] = torch.softmax(s / self.tau, 0)
        elif self.kind == "fraction":
            out[valid] = s
        else:
            out[valid] = _ranks(s)
        return out

    def normalised_fitness(self, fitness: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[pop] fitness on the sparsity score's scale (see module docstring)."""
        out = torch.zeros(fitness.shape, dtype=torch.float64)
        if not valid.any():
            return out
        f = fitness.double()[valid]
        if self.kind == "softmax":
            out[valid] = f / f.sum() if f.sum() > 0 else torch.full_like(f, 1.0 / f.numel())
        elif self.kind == "fraction":
            out[valid] = f / f.max() if f.max() > 0 else torch.zeros_like(f)
        else:
            out[valid] = _ranks(f)
        return out

    def total(
        self, scores: torch.Tensor, sparsity: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[pop] non-negative total score; 0 on empty slots."""
        valid = torch.ones(scores.shape[0], dtype=torch.bool) if valid is None else valid.bool()
        fit = self.normalised_fitness(self.fitness(scores, valid), valid)
        return (self.omega * fit + self.beta * self.sparsity_score(sparsity, valid)) * valid
