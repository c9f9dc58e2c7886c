"""The M2N2 digits model: a 64-256-10 MLP in a ParamSpace, and its two kinds of parents."""

from __future__ import annotations

import torch
from torch import nn

from sparse_merge.errors import check_choice, check_positive
from sparse_merge.models.paramspace import ParamSpace
from sparse_merge.tasks.digits import DigitsTask


class DigitsMLP(nn.Module):
    """64 -> hidden -> 10 with ReLU."""

    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, 10] of images [N, 64]."""
        return self.net(x)


def train_on_classes(
    space: ParamSpace, task: DigitsTask, classes: list[int], steps: int, lr: float
) -> torch.Tensor:
    """Adam on the training images of ``classes`` only (full batch); returns the genome."""
    keep = torch.isin(task.selection.labels, torch.tensor(classes))
    x, y = task.selection.images[keep], task.selection.labels[keep]
    model = space.model
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return space.genome()


class DigitsParents:
    """Two parents for the digits experiment.

    ``init='scratch'``: two MLPs with every parameter drawn from N(0, std^2) (std 0.01, as in
    M2N2). ``init='pretrained'``: two MLPs trained briefly with Adam, one on digits 0-4 and one
    on digits 5-9.
    """

    def __init__(
        self,
        init: str = "scratch",
        hidden: int = 256,
        std: float = 0.01,
        pretrain_steps: int = 100,
        lr: float = 1e-3,
    ) -> None:
        self.init = check_choice("init", init, ("scratch", "pretrained"))
        self.hidden = int(check_positive("hidden", hidden))
        self.std = float(check_positive("std", std))
        self.pretrain_steps = int(check_positive("pretrain_steps", pretrain_steps))
        self.lr = float(check_positive("lr", lr))
        self.name = f"digits_mlp_{init}"

    def space(self) -> ParamSpace:
        """A fresh MLP in a ParamSpace (the live model the genomes are loaded into)."""
        return ParamSpace(DigitsMLP(self.hidden))

    def parents(
        self, space: ParamSpace, task: DigitsTask, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """The two parent genomes [P] (seeded by ``generator``)."""
        genomes = {}
        for name, classes in (("digits_0_4", [0, 1, 2, 3, 4]), ("digits_5_9", [5, 6, 7, 8, 9])):
            genome = torch.randn(space.numel, generator=generator) * self.std
            if self.init == "pretrained":
                space.load(genome)
                genome = train_on_classes(space, task, classes, self.pretrain_steps, self.lr)
            genomes[name if self.init == "pretrained" else f"random_{len(genomes)}"] = genome
        return genomes
