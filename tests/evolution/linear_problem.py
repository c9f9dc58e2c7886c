"""A Problem small enough for engine tests: a linear classifier on fixed random points."""

from __future__ import annotations

import torch

from sparse_merge.pruning.base import keep_smallest_out


class LinearProblem:
    """Genome = a [classes, inputs] weight matrix; a datapoint scores 1 when classified right.

    The two initial genomes are the true weights with a different half of the classes
    scrambled, so each parent solves different datapoints (distinct niches).
    """

    prune_is_mask = True  # magnitude pruning only zeroes weights

    def __init__(self, n_in: int = 8, n_classes: int = 4, n: int = 48, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.shape = (n_classes, n_in)
        self.numel = n_classes * n_in
        w = torch.randn(self.shape, generator=g)
        x = torch.randn(2 * n, n_in, generator=g)
        y = (x @ w.T).argmax(1)
        self.x, self.y = x[:n], y[:n]
        self.hx, self.hy = x[n:], y[n:]
        self.n_datapoints = n
        self.task_names = ["linear"]
        half = n_classes // 2
        a, b = w.clone(), w.clone()
        a[half:] = torch.randn(n_classes - half, n_in, generator=g)
        b[:half] = torch.randn(half, n_in, generator=g)
        self._initial = {"a": a.flatten(), "b": b.flatten()}
        self._ws = torch.zeros(self.numel)
        self.evaluations = 0
        self.heldout_calls = 0
        self.prunes = 0

    @property
    def workspace(self) -> torch.Tensor:
        return self._ws

    def initial(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self._initial.items()}

    def evaluate(self, genome: torch.Tensor) -> torch.Tensor:
        self.evaluations += 1
        return ((self.x @ genome.view(self.shape).T).argmax(1) == self.y).float()

    def heldout(self, genome: torch.Tensor) -> dict[str, float]:
        self.heldout_calls += 1
        acc = float(((self.hx @ genome.view(self.shape).T).argmax(1) == self.hy).float().mean())
        return {"linear": acc, "mean": acc}

    def sparsity(self, genome: torch.Tensor) -> float:
        return float((genome == 0).double().mean())

    def prune_(self, genome: torch.Tensor, target: float) -> None:
        self.prunes += 1
        keep = keep_smallest_out(genome.abs(), round(target * self.numel))
        genome.masked_fill_(~keep, 0.0)
