"""MAP-Elites baseline: a grid of elites over the selection accuracy on two groups of
datapoints (for digits: odd and even training images), as in the M2N2 reference.

Each step draws two elites in proportion to their quality (overall selection accuracy), crosses them over (SLERP with a random weight and split
point), mutates the child (Gaussian noise, off when ``mutation_std = 0``, the setting for
pre-trained parents), and puts it into the cell of its two group accuracies
(``floor(acc * bins)``, an accuracy of 1 in the last bin) when the cell is empty or the child
beats its elite. The problem provides the groups as ``descriptor_masks`` (two bool [D] masks).

The two elites are drawn with replacement (the same elite may be drawn twice: the child is then
that elite, mutated) while the elites' qualities sum to less than ``replace_below``, and as two
distinct elites afterwards. The M2N2 reference code draws with replacement while the qualities
sum to less than 2 (``replace_below: 2``), so from random parents the first steps are mostly
mutations of one elite; ``replace_below: 0`` draws distinct elites whenever two cells are filled.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from sparse_merge.errors import ConfigError, check_int, check_positive
from sparse_merge.evolution.crossover import Crossover
from sparse_merge.evolution.curve import Curve
from sparse_merge.evolution.mutation import mutate_
from sparse_merge.evolution.selection import sample_index


class MapElites:
    """MAP-Elites with a ``bins x bins`` grid; one step = one child = one forward pass."""

    def __init__(
        self,
        bins: int = 10,
        mutation_std: float = 0.01,
        crossover: str = "slerp_split",
        replace_below: float = 2.0,
        progress: bool = True,
    ) -> None:
        self.bins = check_int("bins", bins, minimum=1)  # 2.5 refused, not truncated
        self.mutation_std = float(
            check_positive("mutation_std", mutation_std, allow_zero=True, finite=True)
        )
        self.crossover = Crossover.named(crossover)
        self.replace_below = float(check_positive("replace_below", replace_below, allow_zero=True))
        self.progress = bool(progress)

    def cell(self, scores: torch.Tensor, masks: list[torch.Tensor]) -> tuple[int, int]:
        """Grid cell of a score row [D]: the binned accuracy on each of the two groups."""
        accs = [float(scores[m].mean()) for m in masks]
        i, j = (min(int(a * self.bins), self.bins - 1) for a in accs)
        return i, j

    @torch.no_grad()
    def run(self, problem, budget: int, seed: int, curve: Curve) -> dict[str, torch.Tensor]:
        """Spend ``budget`` forward passes; returns the elite with the best quality."""
        masks = list(problem.descriptor_masks)
        if len(masks) != 2:
            raise ConfigError("descriptor_masks", len(masks), "two groups of datapoints")
        cells = self.bins * self.bins
        genomes = torch.zeros(cells, problem.numel)  # [cells, P]
        quality = torch.zeros(cells, dtype=torch.float64)  # [cells]
        filled = torch.zeros(cells, dtype=torch.bool)  # [cells]
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 41)
        noise_gen = torch.Generator().manual_seed(seed * 1_000_003 + 43)

        changed = [-1]  # the cell the last offer changed (-1: none)

        def offer(genome: torch.Tensor, scores: torch.Tensor) -> bool:
            i, j = self.cell(scores, masks)
            c = i * self.bins + j
            q = float(scores.mean())
            changed[0] = -1
            if not filled[c] or q > quality[c]:
                genomes[c].copy_(genome)
                quality[c], filled[c] = q, True
                changed[0] = c
            return changed[0] >= 0

        for genome in problem.initial().values():
            offer(genome, problem.evaluate(genome))
        ws = problem.workspace
        best, test = -1, 0.0  # the best cell and its elite's held-out score
        for step in tqdm(range(budget), desc="map_elites", disable=None if self.progress else True):
            p1 = sample_index(quality, filled, gen)
            distinct = int(filled.sum()) > 1 and float(quality.sum()) >= self.replace_below
            p2 = sample_index(quality, filled, gen, exclude=p1 if distinct else None)
            self.crossover(ws, genomes[p1], genomes[p2], gen)
            mutate_(ws, self.mutation_std, noise_gen)
            if offer(ws, problem.evaluate(ws)) or best < 0:
                new = int(torch.where(filled, quality, -1.0).argmax())
                if new != best or changed[0] == new:  # held-out evaluation only when it moved
                    best, test = new, problem.heldout(genomes[new])["mean"]
            curve.append(step + 1, float(quality[best]), test)
        best = int(torch.where(filled, quality, -1.0).argmax())
        return {"map_elites": genomes[best].clone()}
