"""Mask files: save, load and apply keep-masks, with the metadata that says where they came from.

A mask directory holds ``masks.safetensors`` and a readable copy of the metadata in
``metadata.json``. The usual layout is ``<root>/<model>/sparsity50_<method>/`` (``mask_dir``).
A directory is written to a temporary sibling and renamed into place, so a crash never leaves
half a mask set behind.

``masks.safetensors`` stores one bit per weight (format ``packbits-v1``):

- one 1-D uint8 tensor per weight parameter, named after it: the mask (True = kept) flattened
  in row-major order of its logical shape and packed by ``numpy.packbits`` (most significant
  bit first, last byte padded with zero bits), ``ceil(numel / 8)`` bytes;
- header metadata (safetensors' string-to-string map):
  ``"mask_format": "packbits-v1"``, ``"mask_shapes"``: JSON ``{name: [dim, ...]}`` with each
  mask's shape, and ``"sparse_merge"``: the JSON metadata (``METADATA_FIELDS`` and more).

Files written before packing (no ``mask_format`` key) hold one bool tensor per weight, in the
weight's own shape; ``load_masks`` reads both and returns the same bool masks.

Before masks from a file are used, ``check_mask_sparsity`` and ``check_mask_source`` compare
them with the run: their overall sparsity with the run's ``sparsity``, their metadata
``source_hash`` with the ``model_hash`` of the model they are applied to.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from sparse_merge.errors import ConfigError
from sparse_merge.pruning.base import Masks
from sparse_merge.pruning.stats import overall_sparsity
from sparse_merge.tracking.io import write_atomic_dir

MASKS_FILE = "masks.safetensors"
METADATA_FILE = "metadata.json"
METADATA_KEY = "sparse_merge"  # key of the JSON metadata in the safetensors header
FORMAT_KEY = "mask_format"  # header key of the file format; absent in bool files (the old one)
SHAPES_KEY = "mask_shapes"  # header key of the JSON {name: shape} of packed masks
PACKED_FORMAT = "packbits-v1"
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
    """``<root>/<model>/sparsity<percent>_<method>``, e.g. ``masks/toy-llama/sparsity50_wanda``;
    a percent that is not whole keeps its decimals (``sparsity50.4_wanda``, ``sparsity00.5_``),
    so that two sparsities never share a folder (rounded, 0.5 and 0.504 did, and the second
    set replaced the first)."""
    safe_model = str(model).replace("/", "--")
    return Path(root) / safe_model / f"sparsity{_percent(sparsity)}_{method}"


def _percent(sparsity: float) -> str:
    """``sparsity`` in percent, two digits at least: ``50``, ``05``, ``12.5``, ``00.5``."""
    percent = sparsity * 100
    whole = round(percent)
    if math.isclose(percent, whole, rel_tol=0.0, abs_tol=1e-9):
        return f"{whole:02d}"
    return ("0" if percent < 10 else "") + format(percent, ".6g")


@torch.no_grad()
def model_hash(model: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of every parameter's name, shape, dtype and bytes: which
    weights a mask was computed from."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask (any shape) as its flattened bits, 8 to a byte: uint8 ``[ceil(numel / 8)]``."""
    # numpy's packbits is vectorised C and shares memory with torch both ways: ~25 ms for 135M
    # weights on one thread, no hand-written bit twiddling to get wrong.
    flat = mask.detach().cpu().contiguous().reshape(-1).numpy()  # [numel] bool, row-major
    return torch.from_numpy(np.packbits(flat))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The bool mask of ``shape`` that ``pack_mask`` turned into ``packed``."""
    bits = np.unpackbits(packed.cpu().numpy(), count=math.prod(shape))  # [numel] uint8 0/1
    return torch.from_numpy(bits).view(torch.bool).reshape(shape)


def save_masks(directory: str | Path, masks: Masks, metadata: Mapping[str, Any]) -> Path:
    """Write ``masks`` (bool, by weight parameter name) and ``metadata`` to ``directory``.

    ``metadata`` should hold ``METADATA_FIELDS`` (method, importance, sparsity, granularity,
    model, source_hash; ``date`` is filled in with the current UTC time when absent); any other
    JSON-ready keys are kept too. Masks are stored one bit per weight (see the module docstring).
    """
    out = Path(directory)
    meta = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **dict(metadata)}
    tensors, shapes = {}, {}
    for name, mask in masks.items():
        if mask.dtype != torch.bool:
            raise TypeError(f"mask {name} has dtype {mask.dtype}; masks are bool (True = kept)")
        tensors[name] = pack_mask(mask)
        shapes[name] = list(mask.shape)
    header = {
        FORMAT_KEY: PACKED_FORMAT,
        SHAPES_KEY: json.dumps(shapes),
        METADATA_KEY: json.dumps(meta, sort_keys=True),
    }

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / MASKS_FILE), metadata=header)
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    return write_atomic_dir(out, write)


def _read_packed(path: Path, name: str, packed: torch.Tensor, shape: Any) -> torch.Tensor:
    """The bool mask ``name`` of ``path``, after checking its recorded shape fits its bytes."""
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise ValueError(
            f"mask {name!r} in {path}: recorded shape {shape!r} is not a list of sizes"
        )
    shape = tuple(shape)
    expected = math.ceil(math.prod(shape) / 8)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise ValueError(
            f"mask {name!r} in {path}: recorded shape {shape} needs a uint8 tensor of "
            f"{expected} bytes, the file holds {packed.dtype} of shape {tuple(packed.shape)}"
        )
    return unpack_mask(packed, shape)


def load_masks(directory: str | Path, device: str | torch.device = "cpu") -> tuple[Masks, dict]:
    """(masks by weight parameter name, metadata) of a directory written by ``save_masks``,
    packed or in the older one-bool-per-weight format."""
    path = Path(directory) / MASKS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {MASKS_FILE} in {directory}")
    masks: Masks = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        header = f.metadata() or {}
        fmt = header.get(FORMAT_KEY)
        if fmt not in (None, PACKED_FORMAT):
            raise ValueError(
                f"{path}: {FORMAT_KEY} {fmt!r} is unknown; this version reads "
                f"{PACKED_FORMAT!r} and unversioned bool files"
            )
        try:
            shapes = json.loads(header.get(SHAPES_KEY, "{}")) if fmt else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: {SHAPES_KEY} is not JSON ({e})") from e
        missing = sorted(set(f.keys()) - set(shapes)) if fmt else []
        if missing:
            raise ValueError(f"{path}: {SHAPES_KEY} records no shape for masks {missing}")
        for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            stored = f.get_tensor(name)
            if fmt:
                mask = _read_packed(path, name, stored, shapes[name])
            elif stored.dtype == torch.bool:
                mask = stored
            else:
                raise ValueError(
                    f"mask {name!r} in {path} is {stored.dtype}; an unversioned "
                    "mask file holds bool tensors"
                )
            masks[name] = mask.to(device)
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


def check_mask_sparsity(
    masks: Masks, metadata: Mapping[str, Any], sparsity: float, source: str, tolerance: float = 0.01
) -> None:
    """Raise ``ConfigError`` (key ``sparsity``) unless the masks' overall sparsity is within
    ``tolerance`` of ``sparsity``: results would report a target the masks do not have.
    ``source`` says where the masks came from (``lora.mask_path=...``)."""
    measured = overall_sparsity(masks)
    if abs(measured - sparsity) <= tolerance:
        return
    saved = metadata.get("sparsity")
    matches = isinstance(saved, int | float) and abs(saved - measured) <= tolerance
    suggest = saved if matches else round(measured, 4)
    raise ConfigError(
        "sparsity",
        sparsity,
        f"{source} holds masks of sparsity {measured:.4f}"
        + (f" (saved with sparsity={saved})" if saved is not None else "")
        + f"; set sparsity={suggest} to use them, or give masks of sparsity {sparsity}",
    )


def check_mask_source(
    metadata: Mapping[str, Any], loaded_hash: str, key: str, path: Any, hint: str = ""
) -> None:
    """Raise ``ConfigError`` (``key``, ``path``) when the masks' metadata ``source_hash`` is not
    ``loaded_hash`` (``model_hash`` of the model they are about to mask): masks of another model
    of the same shape would pass every shape check. Masks without a ``source_hash`` pass.
    ``hint`` is appended to the message (how to override)."""
    recorded = metadata.get("source_hash")
    if recorded is None or recorded == loaded_hash:
        return
    origin = f" of {metadata['model']!r}" if metadata.get("model") else ""
    raise ConfigError(
        key,
        path,
        f"masks{origin} computed from weights with source_hash {recorded!r}, but the loaded "
        f"model has hash {loaded_hash!r} (the hash covers weights and dtype); use masks "
        f"computed from this model{hint}",
    )
