"""Row-sparse fine-tuning: a trainable update on selected output rows of each linear layer.

``RowSparseLinear`` computes ``base(x)`` plus ``x @ dW^T`` scattered into the selected output
features (``index_add`` on the last dim), so a dense ``[out, in]`` update is never built; the
merge writes ``W[rows] += dW`` exactly. The base may be a full-precision ``nn.Linear`` or an
``NF4Linear``; with ``init='residual'`` the update starts at the selected rows of the
quantisation residual ``W - Q(W)``, so those rows start with zero quantisation error.

On a pruned base, ``row_mask`` (the keep-mask of the selected rows, ``M[rows]``) multiplies the
update in the forward, the merge and the saved file, so pruned weights stay exactly zero; the
masked entries of ``delta`` get zero gradient and never change what the layer computes.
``delta`` is kept in fp32 when the base is in half precision (as PEFT keeps LoRA weights).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from sparse_merge.errors import check_choice
from sparse_merge.finetune.nf4 import NF4Linear, dequantize_nf4, quantize_nf4
from sparse_merge.tracking.io import write_atomic


class RowSparseLinear(nn.Module):
    """``y = base(x) + scatter_rows(x @ delta^T)``; only ``delta`` [k, in] trains."""

    def __init__(
        self,
        base: nn.Linear | NF4Linear,
        rows: torch.Tensor,
        init: str = "zeros",
        full_weight: torch.Tensor | None = None,
        row_mask: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        check_choice("init", init, ("zeros", "residual"))
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.register_buffer("rows", rows.detach().clone().long().sort().values)  # [k]
        in_features = base.in_features
        weight = self.base_weight()
        k = self.rows.numel()
        if row_mask is not None and tuple(row_mask.shape) != (k, in_features):
            raise ValueError(f"row_mask {tuple(row_mask.shape)} != {(k, in_features)}")
        self.register_buffer(
            "row_mask", None if row_mask is None else row_mask.to(weight.device, torch.bool)
        )  # [k, in] keep-mask of the selected rows, or None (dense rows)
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        delta = torch.zeros(k, in_features, dtype=dtype, device=weight.device)
        if init == "residual":
            if full_weight is None:
                raise ValueError("init='residual' needs the full-precision weight")
            full = full_weight.to(device=weight.device, dtype=torch.float32)
            delta = (full - weight.float())[self.rows].to(dtype)  # [k, in]
        self.delta = nn.Parameter(delta)
        if self.row_mask is not None:
            with torch.no_grad():
                self.delta.mul_(self.row_mask)

    def base_weight(self) -> torch.Tensor:
        """The frozen base weight [out, in] (dequantised for an NF4 base)."""
        if isinstance(self.base, NF4Linear):
            return self.base.dequantized_weight()
        return self.base.weight

    def effective_delta(self) -> torch.Tensor:
        """The update [k, in] the layer adds to its rows (``delta * row_mask`` on a pruned base)."""
        return self.delta if self.row_mask is None else self.delta * self.row_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output plus the row update, added only to the selected features."""
        y = self.base(x)  # [..., out]
        update = nn.functional.linear(x, self.effective_delta().to(x.dtype))  # [..., k]
        return y.index_add(-1, self.rows, update.to(y.dtype))  # into the selected rows

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``W[rows] += delta`` (exact, in the base's dtype)."""
        weight = self.base_weight().detach().clone()
        weight[self.rows] += self.effective_delta().to(weight.dtype)
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


def save_row_update(
    model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """The selected rows and (masked) updates of every layer, in one small safetensors file;
    ``metadata`` (strings) goes into the file's header."""
    tensors = {}
    for name, m in row_sparse_modules(model).items():
        tensors[f"{name}.rows"] = m.rows.cpu()
        tensors[f"{name}.delta"] = m.effective_delta().detach().cpu().contiguous()
    return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


@torch.no_grad()
def load_row_update(model: nn.Module, path: str | Path) -> nn.Module:
    """Add a saved update to ``model``'s linear layers (merged: ``W[rows] += delta``).

    An update trained on an NF4 base (header ``quantize: nf4``) is added to the NF4-rounded
    weight ``Q(W)`` of each updated layer, which reproduces the merged model of the run exactly
    (the quantiser is deterministic)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    tensors = load_file(str(path))
    for key in [k for k in tensors if k.endswith(".rows")]:
        name = key.removesuffix(".rows")
        weight = model.get_submodule(name).weight
        if meta.get("quantize") == "nf4":
            q = quantize_nf4(weight, int(meta.get("block_size", 64)))
            weight.copy_(dequantize_nf4(q, weight.dtype))
        weight[tensors[key].long()] += tensors[f"{name}.delta"].to(weight)
    return model
