"""The archive: a fixed number of slots holding genomes, their selection scores, their sparsity
and their lineage ids, plus the replacement rule (the lowest total score leaves)."""

from __future__ import annotations

import torch

from sparse_merge.evolution.scoring import SparsityAwareScorer


class Archive:
    """``pop_size`` slots; an empty slot (``valid=False``) holds nothing and is never sampled.

    genomes [pop, P] (the problem's dtype and device), scores [pop, D] (float32, CPU),
    sparsity [pop] (float64, CPU), ids [pop] (lineage id, -1 when empty).
    """

    def __init__(
        self,
        pop_size: int,
        numel: int,
        n_datapoints: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if pop_size < 2:
            raise ValueError(f"pop_size={pop_size}: an archive needs at least 2 slots")
        self.genomes = torch.zeros(pop_size, numel, dtype=dtype, device=device)  # [pop, P]
        self.scores = torch.zeros(pop_size, n_datapoints, dtype=torch.float32)  # [pop, D]
        self.sparsity = torch.zeros(pop_size, dtype=torch.float64)  # [pop]
        self.valid = torch.zeros(pop_size, dtype=torch.bool)  # [pop]
        self.ids = torch.full((pop_size,), -1, dtype=torch.long)  # [pop]

    @property
    def pop_size(self) -> int:
        """Number of slots."""
        return self.valid.numel()

    def __len__(self) -> int:
        """Number of occupied slots."""
        return int(self.valid.sum())

    def empty_slot(self) -> int | None:
        """The first empty slot, or None when the archive is full."""
        empty = (~self.valid).nonzero()
        return int(empty[0]) if len(empty) else None

    @torch.no_grad()
    def put(
        self, slot: int, genome: torch.Tensor, scores: torch.Tensor, sparsity: float, ident: int
    ) -> None:
        """Copy an individual into ``slot`` (whatever was there leaves)."""
        self.genomes[slot].copy_(genome)
        self.scores[slot] = scores.detach().float().cpu()
        self.sparsity[slot] = float(sparsity)
        self.valid[slot] = True
        self.ids[slot] = int(ident)

    def occupied(self) -> list[int]:
        """Indices of the occupied slots, in slot order."""
        return [int(i) for i in self.valid.nonzero().flatten()]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything needed to restore the archive exactly."""
        return {
            "genomes": self.genomes.cpu(),
            "scores": self.scores,
            "sparsity": self.sparsity,
            "valid": self.valid,
            "ids": self.ids,
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from ``state_dict()`` (shapes must match)."""
        for key in ("genomes", "scores", "sparsity", "valid", "ids"):
            mine = getattr(self, key)
            if mine.shape != state[key].shape:
                raise ValueError(
                    f"checkpoint archive {key} has shape {tuple(state[key].shape)}, "
                    f"expected {tuple(mine.shape)} (different pop_size or problem?)"
                )
            mine.copy_(state[key])


def replacement_slot(
    scorer: SparsityAwareScorer,
    archive: Archive,
    child_scores: torch.Tensor,
    child_sparsity: float,
    enter_on_tie: bool = False,
) -> int | None:
    """The slot a child takes, or None when it does not enter.

    While a slot is empty the child fills it. Otherwise the child joins, totals are computed
    over the archive plus the child, and the individual with the lowest total leaves; on a tie
    at the lowest total the child is the one that leaves (a newcomer must beat someone), or,
    with ``enter_on_tie``, the first tied archive member (the M2N2 reference's argmin).
    """
    slot = archive.empty_slot()
    if slot is not None:
        return slot
    scores = torch.cat([archive.scores, child_scores.float().cpu()[None]])  # [pop + 1, D]
    sparsity = torch.cat([archive.sparsity, torch.tensor([float(child_sparsity)])])
    total = scorer.total(scores, sparsity)  # [pop + 1]
    lowest = (total == total.min()).nonzero().flatten()
    child = archive.pop_size
    if lowest[0] == child or ((lowest == child).any() and not enter_on_tie):
        return None
    return int(lowest[0])
