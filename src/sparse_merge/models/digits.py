"""The M2N2 digits model: a 64-256-10 MLP in a ParamSpace, and its two kinds of parents."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sparse_merge.errors import ConfigError, check_choice, check_positive
from sparse_merge.models.paramspace import ParamSpace
from sparse_merge.tasks.digits import DigitsTask

LAYOUTS = ("in_out", "out_in")
PARENT_NAMES = ("digits_0_4", "digits_5_9")  # pre-trained parents: the classes each one learnt


class DigitsMLP(nn.Module):
    """64 -> hidden -> 10 with ReLU; parameters ``w1, b1, w2, b2`` in that order.

    ``layout`` fixes how the weight matrices lie in the flat genome, which decides what a
    crossover split point cuts: ``in_out`` (the M2N2 reference's layout, ``x @ w1`` with
    ``w1`` [64, H]) stores one input's fan-out after another, so a split point falls between
    input pixels; ``out_in`` (``nn.Linear``'s [H, 64]) stores one unit's fan-in after another,
    so a split point falls between hidden units.
    """

    def __init__(self, hidden: int = 256, layout: str = "in_out") -> None:
        super().__init__()
        self.layout = check_choice("layout", layout, LAYOUTS)
        shape1, shape2 = (
            ((64, hidden), (hidden, 10)) if layout == "in_out" else ((hidden, 64), (10, hidden))
        )
        self.w1 = nn.Parameter(torch.randn(shape1) * 0.01)
        self.b1 = nn.Parameter(torch.zeros(hidden))
        self.w2 = nn.Parameter(torch.randn(shape2) * 0.01)
        self.b2 = nn.Parameter(torch.zeros(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, 10] of images [N, 64]."""
        w1, w2 = (self.w1, self.w2) if self.layout == "in_out" else (self.w1.t(), self.w2.t())
        return torch.addmm(self.b2, torch.addmm(self.b1, x, w1).relu(), w2)


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
    M2N2), seeded by the run's seed. ``init='pretrained'``: two MLPs trained briefly with Adam
    from such a start, one on digits 0-4 and one on digits 5-9 (a new pair per seed).
    ``init='file'``: the pair stored at ``path`` (safetensors with the flat genomes
    ``digits_0_4`` and ``digits_5_9`` in this ``layout``), the same for every seed; e.g. the
    M2N2 reference's own pre-trained pair (``experiments/m2n2_digits/reference_pair.py``).
    """

    def __init__(
        self,
        init: str = "scratch",
        hidden: int = 256,
        std: float = 0.01,
        pretrain_steps: int = 100,
        lr: float = 1e-3,
        layout: str = "in_out",
        path: str | None = None,
    ) -> None:
        self.init = check_choice("init", init, ("scratch", "pretrained", "file"))
        self.hidden = int(check_positive("hidden", hidden))
        self.std = float(check_positive("std", std))
        self.pretrain_steps = int(check_positive("pretrain_steps", pretrain_steps))
        self.lr = float(check_positive("lr", lr))
        self.layout = check_choice("layout", layout, LAYOUTS)
        self.path = None if path is None else Path(path)
        if self.init == "file":
            if self.path is None or not self.path.is_file():
                raise ConfigError("path", path, "a safetensors file with the two parents")
            self._check_file()
        self.name = f"digits_mlp_{init}"

    def _check_file(self) -> None:
        from safetensors import safe_open

        numel = self.space().numel
        with safe_open(str(self.path), framework="pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
            # a file without the key is the reference pair, in the reference's layout
            stored = (f.metadata() or {}).get("layout", "in_out")
        want = {name: [numel] for name in PARENT_NAMES}
        if shapes != want:
            raise ConfigError(
                "path", str(self.path), f"genomes {want} (hidden={self.hidden}), found {shapes}"
            )
        if stored != self.layout:  # the same numbers, read as the other layout: transposed
            raise ConfigError(
                "layout",
                self.layout,
                f"{stored!r}, the layout {self.path} holds its genomes in (read as "
                f"{self.layout!r} its weights were silently transposed)",
            )

    def space(self) -> ParamSpace:
        """A fresh MLP in a ParamSpace (the live model the genomes are loaded into)."""
        return ParamSpace(DigitsMLP(self.hidden, self.layout))

    def parents(
        self, space: ParamSpace, task: DigitsTask, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """The two parent genomes [P] (seeded by ``generator``, except from a file)."""
        if self.init == "file":
            from safetensors.torch import load_file

            stored = load_file(str(self.path))
            return {name: stored[name].float() for name in PARENT_NAMES}
        genomes = {}
        for name, classes in zip(PARENT_NAMES, ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])):
            genome = torch.randn(space.numel, generator=generator) * self.std
            if self.init == "pretrained":
                space.load(genome)
                genome = train_on_classes(space, task, classes, self.pretrain_steps, self.lr)
            genomes[name if self.init == "pretrained" else f"random_{len(genomes)}"] = genome
        return genomes
