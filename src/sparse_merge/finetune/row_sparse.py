"""Row-sparse fine-tuning: a trainable update on selected output rows of each linear layer.

``RowSparseLinear`` computes ``base(x)`` plus ``x @ dW^T`` scattered into the selected output
features (``index_add`` on the last dim), so a dense ``[out, in]`` update is never built; the
merge writes ``W[rows] += dW`` exactly. The base may be a full-precision ``nn.Linear`` or an
``NF4Linear``; with ``init='residual'`` the update starts at the selected rows of the
quantisation residual ``W - Q(W)``, so those rows start with zero quantisation error.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sparse_merge.errors import check_choice
from sparse_merge.finetune.nf4 import NF4Linear
from sparse_merge.tracking.io import write_atomic


class RowSparseLinear(nn.Module):
    """``y = base(x) + scatter_rows(x @ delta^T)``; only ``delta`` [k, in] trains."""

    def __init__(
        self,
        base: nn.Linear | NF4Linear,
        rows: torch.Tensor,
        init: str = "zeros",
        full_weight: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        check_choice("init", init, ("zeros", "residual"))
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.register_buffer("rows", rows.detach().clone().long().sort().values)  # [k]
        in_features = base.in_features
        weight = self.base_weight()
        delta = torch.zeros(
            self.rows.numel(), in_features, dtype=weight.dtype, device=weight.device
        )
        if init == "residual":
            if full_weight is None:
                raise ValueError("init='residual' needs the full-precision weight")
            delta = (full_weight.to(weight) - weight)[self.rows].clone()  # [k, in]
        self.delta = nn.Parameter(delta)

    def base_weight(self) -> torch.Tensor:
        """The frozen base weight [out, in] (dequantised for an NF4 base)."""
        if isinstance(self.base, NF4Linear):
            return self.base.dequantized_weight()
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output plus the row update, added only to the selected features."""
        y = self.base(x)  # [..., out]
        return y.index_add(-1, self.rows, x @ self.delta.t())  # [..., k] into the rows

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``W[rows] += delta`` (exact, in the base's dtype)."""
        weight = self.base_weight().detach().clone()
        weight[self.rows] += self.delta.to(weight.dtype)
        out = nn.Linear(weight.shape[1], weight.shape[0], bias=self.base.bias is not None)
        out = out.to(device=weight.device, dtype=weight.dtype)
        out.weight.copy_(weight)
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
        return out


def row_sparse_modules(model: nn.Module) -> dict[str, RowSparseLinear]:
    """Every ``RowSparseLinear`` in ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, RowSparseLinear)}


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def merge_row_sparse(model: nn.Module) -> nn.Module:
    """Replace every ``RowSparseLinear`` by its merged ``nn.Linear``, in place."""
    for name, module in row_sparse_modules(model).items():
        _set_module(model, name, module.merged())
    return model


def save_row_update(model: nn.Module, path: str | Path) -> Path:
    """The selected rows and updates of every layer, in one small safetensors file."""
    tensors = {}
    for name, m in row_sparse_modules(model).items():
        tensors[f"{name}.rows"] = m.rows.cpu()
        tensors[f"{name}.delta"] = m.delta.detach().cpu().contiguous()
    return write_atomic(path, lambda tmp: save_file(tensors, str(tmp)))


@torch.no_grad()
def load_row_update(model: nn.Module, path: str | Path) -> nn.Module:
    """Add a saved update to ``model``'s linear layers (merged: ``W[rows] += delta``)."""
    tensors = load_file(str(path))
    for key in [k for k in tensors if k.endswith(".rows")]:
        name = key.removesuffix(".rows")
        weight = model.get_submodule(name).weight
        weight[tensors[key].long()] += tensors[f"{name}.delta"].to(weight)
    return model
