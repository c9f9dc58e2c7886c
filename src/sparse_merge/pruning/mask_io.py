"""Mask files: save, load and apply keep-masks, with the metadata that says where they came from.

A mask directory holds ``masks.safetensors`` (one bool tensor per weight parameter, in the
parameter's own layout, True = kept) whose header also carries the metadata as JSON, and a
readable copy of the metadata in ``metadata.json``. The usual layout is
``<root>/<model>/sparsity50_<method>/`` (``mask_dir``). A directory is written to a temporary
sibling and renamed into place, so a crash never leaves half a mask set behind.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from sparse_merge.pruning.base import Masks
from sparse_merge.tracking.io import write_atomic_dir

MASKS_FILE = "masks.safetensors"
METADATA_FILE = "metadata.json"
METADATA_KEY = "sparse_merge"  # key of the JSON metadata in the safetensors header
METADATA_FIELDS = (
    "method",
    "importance",
    "sparsity",
    "granularity",
    "model",
    "source_hash",
    "date",
)


def mask_dir(root: str | Path, model: str, sparsity: float, method: str) -> Path:
    """``<root>/<model>/sparsity<percent>_<method>``, e.g. ``masks/toy-llama/sparsity50_wanda``."""
    safe_model = str(model).replace("/", "--")
    return Path(root) / safe_model / f"sparsity{round(sparsity * 100):02d}_{method}"


@torch.no_grad()
def model_hash(model: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of every parameter's name, shape, dtype and bytes: which
    weights a mask was computed from."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def save_masks(directory: str | Path, masks: Masks, metadata: Mapping[str, Any]) -> Path:
    """Write ``masks`` (bool, by weight parameter name) and ``metadata`` to ``directory``.

    ``metadata`` should hold ``METADATA_FIELDS`` (method, importance, sparsity, granularity,
    model, source_hash; ``date`` is filled in with the current UTC time when absent); any other
    JSON-ready keys are kept too.
    """
    out = Path(directory)
    meta = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **dict(metadata)}
    text = json.dumps(meta, sort_keys=True)
    tensors = {}
    for name, mask in masks.items():
        if mask.dtype != torch.bool:
            raise TypeError(f"mask {name} has dtype {mask.dtype}; masks are bool (True = kept)")
        tensors[name] = mask.detach().cpu().contiguous()

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / MASKS_FILE), metadata={METADATA_KEY: text})
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    return write_atomic_dir(out, write)


def load_masks(directory: str | Path, device: str | torch.device = "cpu") -> tuple[Masks, dict]:
    """(masks by weight parameter name, metadata) of a directory written by ``save_masks``."""
    path = Path(directory) / MASKS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {MASKS_FILE} in {directory}")
    masks: Masks = {}
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        header = f.metadata() or {}
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            masks[key] = f.get_tensor(key)
    return masks, json.loads(header.get(METADATA_KEY, "{}"))


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Zero every weight whose mask entry is False, in place. Each mask's name must be a
    parameter of ``model`` with the same shape."""
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        if name not in params:
            raise KeyError(f"mask {name!r} names no parameter of {type(model).__name__}")
        p = params[name]
        if tuple(keep.shape) != tuple(p.shape):
            raise ValueError(f"mask {name} has shape {tuple(keep.shape)}, weight {tuple(p.shape)}")
        p.masked_fill_(~keep.to(device=p.device, dtype=torch.bool), 0.0)
