"""Layer-by-layer calibrated pruning (the loop Wanda and SparseGPT share).

The calibration sequences run through the model up to the first decoder block; their inputs
to that block are kept. Then, block by block: the block runs once on those inputs while hooks
on its linear layers accumulate statistics of their inputs (padding excluded), every linear of
the block is pruned from its statistics, and the block runs again, now pruned, to give the
inputs of the next block. Later blocks therefore see activations of the already-pruned ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from sparse_merge.errors import check_fraction
from sparse_merge.models.blocks import PrunableLayer, block_linears, decoder_blocks
from sparse_merge.pruning.base import Calibration
from sparse_merge.pruning.masking import check_nm_sparsity


class InputStat(Protocol):
    """Statistics of a linear layer's inputs, accumulated batch by batch."""

    def add(self, x: torch.Tensor) -> None:
        """Add the inputs ``x`` [n, in] of ``n`` (non-padding) tokens."""
        ...


class _Stop(Exception):
    """Raised by the hook on the first block once its inputs are captured."""


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, h: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, calib: Calibration, batch_size: int
) -> list[tuple[tuple, dict[str, Any], torch.Tensor]]:
    """(args, kwargs, token mask [b, T]) of the first decoder block's call, one per batch."""
    _, blocks = decoder_blocks(model)
    captured: list[tuple[tuple, dict[str, Any]]] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, kwargs))
        raise _Stop

    device = _device(model)
    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    out = []
    try:
        for ids, attn in calib.batches(batch_size):
            ids, attn = ids.to(device), attn.to(device)
            with contextlib.suppress(_Stop):
                model(input_ids=ids, attention_mask=attn, use_cache=False)
            args, kwargs = captured.pop()
            out.append((args, kwargs, attn.bool()))
    finally:
        handle.remove()
    return out


def record_inputs(
    layers: list[PrunableLayer], stats: dict[str, InputStat], token_mask: list[torch.Tensor]
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks adding each layer's inputs [n, in] to ``stats[layer.name]``; tokens where
    ``token_mask[0]`` [b, T] (set by the caller before each batch) is False are left out."""

    def make_hook(stat: InputStat) -> Callable:
        def hook(_module: nn.Module, inputs: tuple) -> None:
            x = inputs[0]  # [b, T, in]
            if token_mask and x.shape[:-1] == token_mask[0].shape:
                x = x[token_mask[0]]  # [n, in]: padding tokens excluded
            stat.add(x.reshape(-1, x.shape[-1]))

        return hook

    return [
        layer.module.register_forward_pre_hook(make_hook(stats[layer.name])) for layer in layers
    ]


def _run_block(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def prune_layerwise(
    model: nn.Module,
    calib: Calibration,
    batch_size: int,
    new_stat: Callable[[PrunableLayer], InputStat],
    prune_layer: Callable[[PrunableLayer, InputStat], None],
    desc: str = "pruning",
) -> None:
    """Run the block-by-block loop: ``new_stat`` makes each linear's accumulator, ``prune_layer``
    prunes a linear (in place) from its accumulated statistics."""
    prefix, blocks = decoder_blocks(model)
    batches = capture_block_inputs(model, calib, batch_size)
    token_mask: list[torch.Tensor] = []  # the current batch's [b, T] mask, read by the hooks
    for index, block in enumerate(tqdm(blocks, desc=desc, leave=False)):
        layers = block_linears(block, prefix, index)
        stats = {layer.name: new_stat(layer) for layer in layers}

        def make_hook(stat: InputStat) -> Callable:
            def hook(_module: nn.Module, inputs: tuple) -> None:
                x = inputs[0]  # [b, T, in]
                mask = token_mask[0]
                if x.shape[:-1] == mask.shape:
                    x = x[mask]  # [n, in]: padding tokens excluded
                stat.add(x.reshape(-1, x.shape[-1]))

            return hook

        handles = [
            layer.module.register_forward_pre_hook(make_hook(stats[layer.name])) for layer in layers
        ]
        try:
            for args, kwargs, mask in batches:
                token_mask[:] = [mask]
                _run_block(block, args, kwargs)
        finally:
            for h in handles:
                h.remove()
        for layer in layers:
            prune_layer(layer, stats[layer.name])
        del stats
        batches = [
            (*_with_hidden(args, kwargs, _run_block(block, args, kwargs)), mask)
            for args, kwargs, mask in batches
        ]


def require_calibration(calib: Calibration | None, who: str) -> Calibration:
    """``calib`` if it holds sequences; an error naming ``who`` otherwise (no silent fallback)."""
    if calib is None or len(calib) == 0:
        raise ValueError(f"{who} needs calibration sequences (got {calib!r}); none were passed")
    return calib


def take(calib: Calibration, n: int) -> Calibration:
    """The first ``n`` calibration sequences (all of them when there are fewer)."""
    return calib.head(n)


class CalibratedPruner:
    """What the layer-wise pruners (Wanda, SparseGPT) share: a granularity or an N:M pattern,
    ``n_calibration`` sequences, and the checks made before any layer is touched."""

    n_calibration: int
    granularity: str
    nm: tuple[int, int] | None

    def pattern(self) -> str:
        """``N:M`` when set, else the granularity (the masks' metadata)."""
        return f"{self.nm[0]}:{self.nm[1]}" if self.nm else self.granularity

    def calibration(self, calib: Calibration | None, sparsity: float) -> Calibration:
        """Checks ``sparsity`` (and that it fits the N:M pattern) and returns the first
        ``n_calibration`` sequences of ``calib`` (an error when there are none)."""
        check_fraction("sparsity", sparsity)
        if self.nm is not None:
            check_nm_sparsity(self.nm, sparsity)
        return take(require_calibration(calib, type(self).__name__), self.n_calibration)
