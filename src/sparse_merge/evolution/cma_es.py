"""CMA-ES baseline (the ``cma`` package): evolves one genome from a from-scratch start.

As in the M2N2 reference, the search starts at a random genome (the problem's first initial
genome, std 0.01) with ``sigma0 = 0.01``, population 20, and minimises minus the selection
accuracy; the step size follows cumulative step-size adaptation (CSA), which is what the
reference's ``cma`` 4.0.0 used for a full covariance (newer ``cma`` releases switch to
two-point adaptation, TPA, above 300 dimensions: ``sigma_adaptation: tpa``).

``covariance`` picks the model of the search distribution:

- ``identity`` (the digits experiment): the covariance stays the identity; mean and step size
  adapt as in full CMA-ES. For the digits MLP (N = 19,210, population 20) the ``cma`` package's
  own full-covariance learning rates are c1 = 5.4e-9 and cmu = 2.4e-8 per generation, so over
  the 2,500 generations of a 50,000-evaluation budget the full covariance moves from the
  identity by about (c1 + cmu) * 2,500 = 7e-5: holding it fixed is full CMA-ES to that
  precision, at O(N) instead of O(N^2) memory and time per generation.
- ``full``: the full covariance (the reference's algorithm; a 19,210^2 matrix of 3 GB and
  eigendecompositions of it: for small problems or a big machine).
- ``diagonal``: sep-CMA-ES, a diagonal covariance with learning rates about N/3 times larger;
  a different algorithm, which on the digits problem ends well below the full one.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from sparse_merge.errors import ConfigError, check_choice, check_positive
from sparse_merge.evolution.curve import Curve

COVARIANCES = ("identity", "full", "diagonal")
SIGMA_ADAPTATIONS = ("csa", "tpa")


def cma_options(covariance: str, sigma_adaptation: str) -> dict:
    """The ``cma`` options for a covariance model and a step-size rule."""
    from cma.sigma_adaptation import CMAAdaptSigmaCSA, CMAAdaptSigmaTPA

    adapt = {"csa": CMAAdaptSigmaCSA, "tpa": CMAAdaptSigmaTPA}[sigma_adaptation]
    opts = {"AdaptSigma": adapt}
    if covariance == "identity":
        # the diagonal sampler with covariance learning switched off: C stays I exactly, and
        # sampling costs O(N) (the full sampler would still build N x N matrices)
        opts.update(CMA_diagonal=True, CMA_on=0)
    elif covariance == "diagonal":
        opts["CMA_diagonal"] = True
    return opts


class CMAES:
    """CMA-ES over flat genomes; one generation = ``popsize`` forward passes (batched)."""

    def __init__(
        self,
        popsize: int = 20,
        sigma0: float = 0.01,
        covariance: str = "identity",
        sigma_adaptation: str = "csa",
        progress: bool = True,
    ) -> None:
        if isinstance(popsize, bool) or not isinstance(popsize, int) or popsize < 2:
            raise ConfigError("popsize", popsize, "a whole number >= 2")  # 2.5: not truncated
        self.popsize = popsize
        self.sigma0 = float(check_positive("sigma0", sigma0, finite=True))
        self.covariance = check_choice("covariance", covariance, COVARIANCES)
        self.sigma_adaptation = check_choice(
            "sigma_adaptation", sigma_adaptation, SIGMA_ADAPTATIONS
        )
        self.progress = bool(progress)

    def check_budget(self, budget: int) -> None:
        """Refuse a budget that is not a whole number of generations (as the reference's
        ``assert``): the remainder would go unspent, and a budget below ``popsize`` runs no
        generation at all and reports the random start as the result."""
        if int(budget) % self.popsize != 0:
            raise ConfigError(
                "budget",
                budget,
                f"a multiple of the CMA-ES population (popsize={self.popsize}): one "
                f"generation is popsize forward passes",
            )

    def run(self, problem, budget: int, seed: int, curve: Curve) -> dict[str, torch.Tensor]:
        """Spend ``budget`` forward passes (whole generations); returns the best genome."""
        import cma

        self.check_budget(budget)
        start = next(iter(problem.initial().values()))  # [P]
        rng = np.random.default_rng(seed)
        opts = {
            "popsize": self.popsize,
            "seed": seed + 1,
            "randn": lambda *shape: rng.standard_normal(shape),
            "verbose": -9,
            "verb_disp": 0,
            "verb_log": 0,
            "tolfun": 0,  # never stop early: accuracy plateaus are common and the budget rules
            "tolflatfitness": 10**9,
            "tolstagnation": 10**9,
            "tolx": 0,
            **cma_options(self.covariance, self.sigma_adaptation),
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
