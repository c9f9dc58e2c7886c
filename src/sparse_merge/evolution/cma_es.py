"""CMA-ES baseline (the ``cma`` package): evolves one genome from a from-scratch start.

As in the M2N2 reference, the search starts at a random genome (the problem's first initial
genome, std 0.01) with ``sigma0 = 0.01``, population 20, and minimises minus the selection
accuracy. With ``diagonal=True`` (the default) the covariance is diagonal (sep-CMA-ES): a full
covariance over the digits MLP's 19,210 parameters is a 19,210 x 19,210 matrix (3 GB, O(N^2)
per generation), out of reach on a small CPU; the reference code used the full one. This is
an approximation of the reference baseline, noted in the results.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from sparse_merge.errors import ConfigError, check_positive
from sparse_merge.evolution.curve import Curve


class CMAES:
    """CMA-ES over flat genomes; one generation = ``popsize`` forward passes (batched)."""

    def __init__(
        self, popsize: int = 20, sigma0: float = 0.01, diagonal: bool = True, progress: bool = True
    ) -> None:
        self.popsize = int(check_positive("popsize", popsize))
        if self.popsize < 2:
            raise ConfigError("popsize", popsize, "an integer >= 2")
        self.sigma0 = float(check_positive("sigma0", sigma0))
        self.diagonal = bool(diagonal)
        self.progress = bool(progress)

    def run(self, problem, budget: int, seed: int, curve: Curve) -> dict[str, torch.Tensor]:
        """Spend ``budget`` forward passes (whole generations); returns the best genome."""
        import cma

        start = next(iter(problem.initial().values()))  # [P]
        rng = np.random.default_rng(seed)
        opts = {
            "popsize": self.popsize,
            "seed": seed + 1,
            "randn": lambda *shape: rng.standard_normal(shape),
            "CMA_diagonal": self.diagonal,
            "verbose": -9,
            "verb_disp": 0,
            "verb_log": 0,
            "tolfun": 0,  # never stop early: accuracy plateaus are common and the budget rules
            "tolflatfitness": 10**9,
            "tolstagnation": 10**9,
            "tolx": 0,
        }
        es = cma.CMAEvolutionStrategy(start.double().numpy(), self.sigma0, inopts=opts)
        best = start.clone()
        best_train = -1.0
        evals = 0
        for _ in tqdm(
            range(budget // self.popsize), desc="cma_es", disable=None if self.progress else True
        ):
            solutions = es.ask()
            genomes = torch.from_numpy(np.asarray(solutions)).float()  # [pop, P]
            acc = problem.evaluate_batch(genomes).mean(1)  # [pop]
            es.tell(solutions, (-acc.double()).tolist())
            evals += self.popsize
            i = int(acc.argmax())
            if float(acc[i]) > best_train:
                best_train, best = float(acc[i]), genomes[i].clone()
            curve.record(evals, best, best_train)
        return {"cma_es": best}
