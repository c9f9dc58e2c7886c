"""Brute-force baseline: a grid of SLERP weights between the two parents, best by selection
score.

The grid has one point per forward pass of the budget (``linspace(0, 1, budget)``, as the M2N2
reference's 10,000 points for a 10,000 budget). Points are visited coarse to fine (in
bit-reversed order), so after ``k`` forward passes the points seen form a near-uniform grid of
``k`` weights and the curve is meaningful at every budget; the final result is the same as a
left-to-right sweep, except that among equal selection scores the first visited wins.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from sparse_merge.errors import check_int
from sparse_merge.evolution.crossover import slerp_
from sparse_merge.evolution.curve import Curve


def coarse_to_fine(n: int) -> list[int]:
    """A permutation of ``range(n)`` by bit-reversed rank (0, n/2, n/4, 3n/4, ... scaled)."""
    bits = max(1, (n - 1).bit_length())
    keys = [int(f"{i:0{bits}b}"[::-1], 2) for i in range(1 << bits)]
    return [k for k in keys if k < n]


class BruteForce:
    """SLERP grid search between the two initial genomes (pre-trained parents)."""

    def __init__(self, batch_size: int = 20, progress: bool = True) -> None:
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.progress = bool(progress)

    def run(self, problem, budget: int, seed: int, curve: Curve) -> dict[str, torch.Tensor]:
        """Evaluate ``budget`` grid points; returns the best interpolation (``seed`` only
        seeds the parents)."""
        a, b = list(problem.initial().values())[:2]
        weights = torch.linspace(0, 1, budget, dtype=torch.float64)
        order = coarse_to_fine(budget)
        batch = torch.empty(self.batch_size, problem.numel)  # [B, P]
        best, best_train, best_w = a.clone(), -1.0, 0.0
        evals = 0
        for s in tqdm(
            range(0, budget, self.batch_size),
            desc="brute_force",
            disable=None if self.progress else True,
        ):
            ws = [float(weights[i]) for i in order[s : s + self.batch_size]]
            for row, w in zip(batch, ws):
                slerp_(row, a, b, w)
            acc = problem.evaluate_batch(batch[: len(ws)]).mean(1)  # [B]
            i = int(acc.argmax())  # first of the batch's maxima: the first visited wins ties
            if float(acc[i]) > best_train:
                best_train, best_w, best = float(acc[i]), ws[i], batch[i].clone()
            evals += len(ws)
            curve.record(evals, best, best_train)
        self.best_weight = best_w
        return {"brute_force": best}
