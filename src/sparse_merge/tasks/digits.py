"""The 8x8 handwritten digits scikit-learn ships (1,797 images; offline), as in the M2N2 paper:
the first 80 % train (the selection set: one correctness score per image), the rest test
(held out)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

TRAIN_FRACTION = 0.8


def load_digits_tensors(raw_pixels: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """All images [1797, 64] scaled to [0, 1] (or scikit-learn's raw 0..16 values with
    ``raw_pixels``) and labels [1797], in scikit-learn's order."""
    from sklearn.datasets import load_digits

    data = load_digits()
    scale = 1.0 if raw_pixels else 16.0
    return torch.tensor(data.data / scale, dtype=torch.float32), torch.tensor(
        data.target, dtype=torch.long
    )


@dataclass
class DigitsSplit:
    """A fixed, ordered set of images; ``score`` is 1 where the model's argmax is the label."""

    name: str
    images: torch.Tensor  # [N, 64]
    labels: torch.Tensor  # [N]

    def __len__(self) -> int:
        return self.labels.numel()

    @torch.no_grad()
    def score(self, model: nn.Module, tokenizer: object = None) -> torch.Tensor:
        """[N] bool correctness (``tokenizer`` is unused; kept for the Task protocol)."""
        return model(self.images).argmax(-1) == self.labels


class DigitsTask:
    """Selection split = training images (first 80 %), held-out split = test images.

    ``raw_pixels=True`` keeps the 0..16 pixel values (as the M2N2 reference code does); the
    default scales them to [0, 1].
    """

    name = "digits"

    def __init__(self, raw_pixels: bool = False) -> None:
        self.raw_pixels = bool(raw_pixels)
        x, y = load_digits_tensors(self.raw_pixels)
        n = int(TRAIN_FRACTION * len(y))
        self.selection = DigitsSplit("digits/train", x[:n], y[:n])
        self.heldout = DigitsSplit("digits/test", x[n:], y[n:])
