"""The M2N2 digits problem: the 64-256-10 MLP evaluated straight from flat genomes.

A genome uses the layout of ``DigitsMLP`` in a ``ParamSpace`` (``w1``, ``b1``, ``w2``, ``b2``;
the weights [64, H] and [H, 10] in the reference's ``in_out`` layout, transposed in ``out_in``),
so the parents of ``DigitsParents`` are genomes of this problem as they are. Evaluation slices the genome into
views and runs two matmuls: no ``nn.Module`` is built or loaded per evaluation, and a batch of
genomes (CMA-ES, brute force) is evaluated with batched matmuls in one call.
"""

from __future__ import annotations

import torch

from sparse_merge.errors import check_fraction
from sparse_merge.evolution.problem import slots_layer_sparsity, slots_sparsity
from sparse_merge.models.digits import DigitsParents
from sparse_merge.pruning.base import keep_smallest_out
from sparse_merge.tasks.digits import DigitsTask

WEIGHTS = ("w1", "w2")  # the prunable weights (biases are not pruned)


class DigitsProblem:
    """Natural Niches ``Problem`` over the digits MLP: one 0/1 score per training image (the
    selection set), test accuracy held out.

    ``descriptor_masks`` (odd and even training digits) are the behaviour descriptors of
    MAP-Elites. ``seed`` seeds the parents (random or pre-trained).
    """

    task_names = ["digits"]

    def __init__(self, parents: DigitsParents, task: DigitsTask, seed: int = 0) -> None:
        self.parents = parents
        self.task = task
        self.seed = int(seed)
        self.space = parents.space()
        self.numel = self.space.numel
        self.hidden = parents.hidden
        self.x_sel, self.y_sel = task.selection.images, task.selection.labels  # [D, 64], [D]
        self.x_test, self.y_test = task.heldout.images, task.heldout.labels  # [T, 64], [T]
        self.n_datapoints = len(self.y_sel)
        self.descriptor_masks = [self.y_sel % 2 == 1, self.y_sel % 2 == 0]  # odd, even: [D]
        self._slices = [self.space.slot(n) for n in ("w1", "b1", "w2", "b2")]
        self._in_out = parents.layout == "in_out"
        self._weights = [self.space.slot(n) for n in WEIGHTS]
        self._workspace = torch.zeros(self.numel)  # [P]
        self._initial: dict[str, torch.Tensor] | None = None

    @property
    def workspace(self) -> torch.Tensor:
        """The live buffer [P] (any genome can be evaluated in place; this one is for crossover)."""
        return self._workspace

    def initial(self) -> dict[str, torch.Tensor]:
        """The two parents (from scratch or pre-trained), seeded by ``seed``; built once, a
        fresh copy per call."""
        if self._initial is None:
            generator = torch.Generator().manual_seed(self.seed)
            with torch.enable_grad():  # pre-training works even when called under no_grad
                self._initial = self.parents.parents(self.space, self.task, generator)
        return {name: g.clone() for name, g in self._initial.items()}

    def _params(self, genomes: torch.Tensor) -> list[torch.Tensor]:
        """W1 [B, 64, H], b1 [B, 1, H], W2 [B, H, 10], b2 [B, 1, 10] as views of ``genomes`` [B, P]
        (transposed views in the ``out_in`` layout)."""
        b, h = genomes.shape[0], self.hidden
        w1, b1, w2, b2 = (genomes[:, s.offset : s.stop] for s in self._slices)
        if self._in_out:
            w1, w2 = w1.view(b, 64, h), w2.view(b, h, 10)
        else:
            w1, w2 = w1.view(b, h, 64).transpose(1, 2), w2.view(b, 10, h).transpose(1, 2)
        return [w1, b1.view(b, 1, h), w2, b2.view(b, 1, 10)]

    @torch.no_grad()
    def logits(self, genome: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Logits [N, 10] of one genome [P] on ``images`` [N, 64]."""
        w1, b1, w2, b2 = (p[0] for p in self._params(genome[None]))
        hidden = torch.addmm(b1, images, w1).relu_()  # [N, H]
        return torch.addmm(b2, hidden, w2)  # [N, 10]

    @torch.no_grad()
    def logits_batch(self, genomes: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Logits [B, N, 10] of genomes [B, P] on ``images`` [N, 64] (batched matmuls)."""
        w1, b1, w2, b2 = self._params(genomes)
        hidden = torch.baddbmm(b1, images.expand(len(genomes), -1, -1), w1)
        return torch.baddbmm(b2, hidden.relu_(), w2)  # [B, N, 10]

    def evaluate(self, genome: torch.Tensor) -> torch.Tensor:
        """Float 0/1 correctness [D] on the training images, in their fixed order."""
        return (self.logits(genome, self.x_sel).argmax(-1) == self.y_sel).float()

    def evaluate_batch(self, genomes: torch.Tensor) -> torch.Tensor:
        """Float 0/1 correctness [B, D] of genomes [B, P] on the training images."""
        return (self.logits_batch(genomes, self.x_sel).argmax(-1) == self.y_sel).float()

    def test_accuracy(self, genome: torch.Tensor) -> float:
        """Accuracy on the held-out test images."""
        return float((self.logits(genome, self.x_test).argmax(-1) == self.y_test).float().mean())

    def heldout(self, genome: torch.Tensor) -> dict[str, float]:
        """Test accuracy as ``digits`` and ``mean``."""
        acc = self.test_accuracy(genome)
        return {"digits": acc, "mean": acc}

    def sparsity(self, genome: torch.Tensor, epsilon: float = 0.0) -> float:
        """Fraction of the two weight matrices' entries with ``|w| <= epsilon`` (biases do not
        count); ``epsilon=0``: exact zeros."""
        return slots_sparsity(genome, self._weights, epsilon)

    def layer_sparsity(self, genome: torch.Tensor) -> dict[str, float]:
        """Exact fraction of zeros of ``w1`` and ``w2``."""
        return slots_layer_sparsity(genome, self._weights)

    prune_is_mask = True  # magnitude pruning only zeroes weights (mask caching is exact)

    @torch.no_grad()
    def prune_(self, genome: torch.Tensor, target: float) -> None:
        """Magnitude pruning: exactly ``round(target * n)`` smallest weights of each weight
        matrix set to 0, in place."""
        check_fraction("sparsity", target)
        for s in self._weights:
            w = genome[s.offset : s.stop]
            keep = keep_smallest_out(w.abs(), round(target * w.numel()))
            w.mul_(keep)
