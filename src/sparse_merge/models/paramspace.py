"""All of a model's parameters in one contiguous buffer; the parameters are views into it.

A genome is a 1-D tensor with the buffer's shape. Loading a genome is one ``copy_`` into the
live model, and crossover can write its result straight into the buffer: no model rebuilds and
no round trips through NumPy per evaluation.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Slot:
    """Where one parameter lives in the flat buffer."""

    name: str
    offset: int
    shape: torch.Size

    @property
    def numel(self) -> int:
        """Number of elements."""
        return int(torch.Size(self.shape).numel())

    @property
    def stop(self) -> int:
        """One past the last index."""
        return self.offset + self.numel


class ParamSpace:
    """A model whose parameters are views into one flat buffer ``self.flat`` of shape [P].

    Tied parameters (one ``nn.Parameter`` reachable under two names) get one slot. All
    parameters must share one dtype and device.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        params = list(model.named_parameters(remove_duplicate=True))  # tied weights once
        if not params:
            raise ValueError("ParamSpace: the model has no parameters")
        dtypes = {p.dtype for _, p in params}
        devices = {p.device for _, p in params}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(
                f"ParamSpace needs one dtype and device, got dtypes={sorted(map(str, dtypes))} "
                f"devices={sorted(map(str, devices))}"
            )
        slots, offset = [], 0
        for name, p in params:
            slots.append(Slot(name, offset, p.shape))
            offset += p.numel()
        self.slots: tuple[Slot, ...] = tuple(slots)
        self.flat = torch.empty(offset, dtype=params[0][1].dtype, device=params[0][1].device)  # [P]
        with torch.no_grad():
            for slot, (_, p) in zip(self.slots, params):
                view = self.flat[slot.offset : slot.stop].view(slot.shape)
                view.copy_(p.data)
                p.data = view
        self._by_name = {s.name: s for s in self.slots}

    @property
    def numel(self) -> int:
        """Total number of (unique) parameters P."""
        return self.flat.numel()

    def slot(self, name: str) -> Slot:
        """The slot of a parameter by its (first) name."""
        return self._by_name[name]

    def view(self, genome: torch.Tensor, name: str) -> torch.Tensor:
        """The parameter ``name`` inside ``genome`` (a view, shares storage)."""
        s = self._by_name[name]
        return genome[s.offset : s.stop].view(s.shape)

    def views(self, genome: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """All (name, view) pairs of ``genome``."""
        for s in self.slots:
            yield s.name, genome[s.offset : s.stop].view(s.shape)

    def genome(self) -> torch.Tensor:
        """A copy of the model's current parameters as a genome [P]."""
        return self.flat.detach().clone()

    @torch.no_grad()
    def load(self, genome: torch.Tensor) -> nn.Module:
        """Write ``genome`` into the live model (one copy) and return the model."""
        if genome.shape != self.flat.shape:
            raise ValueError(
                f"genome has shape {tuple(genome.shape)}, expected {tuple(self.flat.shape)}"
            )
        self.flat.copy_(genome)
        return self.model

    def from_model(self, other: nn.Module) -> torch.Tensor:
        """The genome of another model of the same architecture (tensor by tensor, no full copy)."""
        out = torch.empty_like(self.flat)
        params = dict(other.named_parameters(remove_duplicate=True))
        for s in self.slots:
            if s.name not in params:
                raise KeyError(f"parameter {s.name!r} missing in the other model")
            out[s.offset : s.stop].copy_(params[s.name].detach().reshape(-1))
        return out

    def mask_of(self, names: list[str]) -> torch.Tensor:
        """A boolean [P] selecting the parameters in ``names``."""
        mask = torch.zeros(self.numel, dtype=torch.bool, device=self.flat.device)
        for n in names:
            s = self._by_name[n]
            mask[s.offset : s.stop] = True
        return mask
