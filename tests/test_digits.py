import torch
from torch import nn

from sparse_merge.models.digits import DigitsParents
from sparse_merge.tasks.digits import DigitsTask


class _Oracle(nn.Module):
    """Answers the label of an image it has seen (a lookup), 0 otherwise."""

    def __init__(self, images, labels, wrong=False):
        super().__init__()
        self.table = {tuple(x.tolist()): int(y) for x, y in zip(images, labels)}
        self.wrong = wrong

    def forward(self, x):
        out = torch.zeros(len(x), 10)
        for i, row in enumerate(x):
            y = self.table.get(tuple(row.tolist()), 0)
            out[i, (y + 1) % 10 if self.wrong else y] = 1.0
        return out


def test_split_is_first_80_percent():
    task = DigitsTask()
    assert len(task.selection) == 1437 and len(task.heldout) == 360
    assert task.selection.images.max() <= 1.0 and task.selection.images.min() >= 0.0


def test_scores_are_per_image_correctness():
    task = DigitsTask()
    right = _Oracle(task.heldout.images, task.heldout.labels)
    wrong = _Oracle(task.heldout.images, task.heldout.labels, wrong=True)
    assert task.heldout.score(right).all() and not task.heldout.score(wrong).any()
    assert task.heldout.score(right).shape == (360,)


def test_scratch_parents_are_seeded_with_std_001():
    parents = DigitsParents("scratch")
    space = parents.space()
    a = parents.parents(space, DigitsTask(), torch.Generator().manual_seed(0))
    b = parents.parents(space, DigitsTask(), torch.Generator().manual_seed(0))
    assert all(torch.equal(a[k], b[k]) for k in a) and len(a) == 2
    g = next(iter(a.values()))
    assert g.numel() == 64 * 256 + 256 + 256 * 10 + 10
    assert abs(g.std().item() - 0.01) < 5e-4


def test_pretrained_parents_each_know_their_half():
    task = DigitsTask()
    parents = DigitsParents("pretrained", pretrain_steps=100)
    space = parents.space()
    genomes = parents.parents(space, task, torch.Generator().manual_seed(0))
    labels = task.heldout.labels
    for name, lo in (("digits_0_4", True), ("digits_5_9", False)):
        preds = space.load(genomes[name])(task.heldout.images).argmax(-1)
        own = (labels < 5) if lo else (labels >= 5)
        assert (preds[own] == labels[own]).float().mean() > 0.8  # learnt its own digits
        assert (preds[~own] == labels[~own]).float().mean() < 0.05  # never saw the others
