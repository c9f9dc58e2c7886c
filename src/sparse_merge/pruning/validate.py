"""Check a model against masks: every masked weight exactly zero, sparsity overall and per layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparse_merge.pruning.base import Masks
from sparse_merge.tracking.io import write_json


@torch.no_grad()
def validate_masks(
    model: nn.Module, masks: Masks, expected_sparsity: float | None = None, tolerance: float = 0.01
) -> dict[str, Any]:
    """A JSON-ready report on ``model`` against ``masks``.

    ``ok`` is True when every masked weight is exactly zero (``== 0``), every mask names a
    parameter of the model with its shape, and, with ``expected_sparsity``, the masks' overall
    sparsity is within ``tolerance`` of it. Per layer: size, masked count, mask sparsity, the
    weight's own exact sparsity and the number of masked weights that are not zero.
    """
    params = dict(model.named_parameters())
    layers: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    masked_total = numel_total = zeros_total = 0
    for name, keep in masks.items():
        p = params.get(name)
        if p is None:
            problems.append(f"{name}: no such parameter")
            continue
        if tuple(keep.shape) != tuple(p.shape):
            problems.append(f"{name}: mask shape {tuple(keep.shape)} != weight {tuple(p.shape)}")
            continue
        keep = keep.to(p.device, torch.bool)
        masked = int((~keep).sum())
        zeros = int((p == 0).sum())
        bad = int((p[~keep] != 0).sum())
        if bad:
            problems.append(f"{name}: {bad} masked weights are not zero")
        layers[name] = {
            "numel": p.numel(),
            "masked": masked,
            "mask_sparsity": masked / p.numel(),
            "weight_sparsity": zeros / p.numel(),
            "nonzero_masked": bad,
        }
        masked_total += masked
        numel_total += p.numel()
        zeros_total += zeros
    overall = masked_total / max(numel_total, 1)
    if expected_sparsity is not None and abs(overall - expected_sparsity) > tolerance:
        problems.append(
            f"overall mask sparsity {overall:.4f} is not within {tolerance} of {expected_sparsity}"
        )
    return {
        "ok": not problems,
        "problems": problems,
        "expected_sparsity": expected_sparsity,
        "mask_sparsity": overall,
        "weight_sparsity": zeros_total / max(numel_total, 1),
        "masked": masked_total,
        "numel": numel_total,
        "nonzero_masked": sum(v["nonzero_masked"] for v in layers.values()),
        "layers": layers,
    }


def write_report(path: str | Path, report: dict[str, Any]) -> Path:
    """Write a validation report as JSON, atomically."""
    return write_json(path, report)
