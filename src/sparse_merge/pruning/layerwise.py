"""Layer-by-layer calibrated pruning (the loop Wanda and SparseGPT share).

The calibration sequences run through the model up to the first decoder block; their inputs
to that block are kept. Then, block by block: the block runs once on those inputs while hooks
on its linear layers accumulate statistics of their inputs (padding excluded), every linear of
the block is pruned from its statistics, and the block runs again, now pruned, to give the
inputs of the next block. Later blocks therefore see activations of the already-pruned ones.

Fused MoE experts (``models.blocks``: 3-D ``gate_up_proj`` [E, 2*I, H] and ``down_proj``
[E, H, I]) get one statistic per expert, from the inputs that expert actually receives: a hook
on the experts module reads the hidden states and the router's top-k choice of each token, so
expert ``e``'s ``gate_up_proj[e]`` sees exactly the (non-padding) tokens routed to ``e``, and
its ``down_proj[e]`` sees ``act(x @ gate[e]^T) * (x @ up[e]^T)`` of those tokens, computed in
the hook from the block's current weights as the experts' forward computes it (the hook
recomputes it rather than capturing it, so it works with every experts implementation:
eager, ``grouped_mm``, ``batched_mm``). The routing weight scales an expert's output, not its
input, and is not applied. An expert that no calibration token reaches has an empty statistic
(each pruner says what it does then).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sparse_merge.errors import check_fraction
from sparse_merge.models.blocks import (
    ExpertStack,
    PrunableLayer,
    block_linears,
    decoder_blocks,
    prunable_layers,
)
from sparse_merge.pruning.base import Calibration
from sparse_merge.pruning.masking import (
    LayerMasks,
    check_nm_sparsity,
    check_nm_width,
    nm_sparsities,
)

log = logging.getLogger(__name__)


class InputStat(Protocol):
    """Statistics of a layer's inputs, accumulated batch by batch (per expert for a fused MoE
    expert parameter: then it holds one statistic per expert)."""

    def add(self, x: torch.Tensor, expert: int | None = None) -> None:
        """Add the inputs ``x`` [n, in] of ``n`` (non-padding) tokens (those routed to
        ``expert`` for an expert parameter)."""
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


def _tokens(x: torch.Tensor, token_mask: list[torch.Tensor]) -> torch.Tensor:
    """The rows of ``x`` [b, T, in] or [b*T, in] (an MoE block flattens its tokens) that are
    not padding, as [n, in]; every row when there is no mask or it does not fit."""
    if token_mask:
        mask = token_mask[0]
        if x.shape[:-1] == mask.shape:
            return x[mask]  # [n, in]: padding tokens excluded
        if x.dim() == 2 and x.shape[0] == mask.numel():
            return x[mask.reshape(-1)]
    return x.reshape(-1, x.shape[-1])


def expert_hidden(experts: nn.Module, x: torch.Tensor, expert: int) -> torch.Tensor:
    """The input of ``down_proj[expert]`` for the tokens ``x`` [n, H] routed to ``expert``:
    ``act(x @ gate^T) * (x @ up^T)`` (or ``act(x @ up^T)`` without a gate), as the experts'
    forward computes it, from the module's current weights."""
    gated = getattr(experts, "has_gate", True) and "gate_up_proj" in experts._parameters
    name = "gate_up_proj" if gated else "up_proj"
    bias = getattr(experts, f"{name}_bias", None) if getattr(experts, "has_bias", False) else None
    out = F.linear(x, getattr(experts, name)[expert], None if bias is None else bias[expert])
    if not gated:
        return experts.act_fn(out)
    apply_gate = getattr(experts, "_apply_gate", None)
    if apply_gate is not None:
        return apply_gate(out)
    gate, up = out.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def _expert_hook(stats: dict[str, InputStat], token_mask: list[torch.Tensor]) -> Callable:
    """Forward pre-hook of a fused experts module adding each expert's routed inputs to
    ``stats`` (by parameter attribute: ``gate_up_proj``/``up_proj`` and/or ``down_proj``)."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        x_all = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
        index = index.reshape(x_all.shape[0], -1)  # [N, k]
        valid = None
        if token_mask and token_mask[0].numel() == x_all.shape[0]:
            valid = token_mask[0].reshape(-1)
        first = next((stats[a] for a in ("gate_up_proj", "up_proj") if a in stats), None)
        down = stats.get("down_proj")
        for e in range(module.num_experts):
            routed = (index == e).any(-1)
            if valid is not None:
                routed &= valid
            x = x_all[routed]  # [n_e, H]: the tokens expert e receives
            if x.shape[0] == 0:
                continue
            if first is not None:
                first.add(x, e)
            if down is not None:
                down.add(expert_hidden(module, x, e), e)

    return hook


def record_inputs(
    layers: list[PrunableLayer], stats: dict[str, InputStat], token_mask: list[torch.Tensor]
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks adding each layer's inputs [n, in] to ``stats[layer.name]``; tokens where
    ``token_mask[0]`` [b, T] (set by the caller before each batch) is False are left out. A
    fused expert parameter gets, per expert, the inputs of the tokens routed to that expert
    (one hook per experts module, see the module docstring)."""

    def make_hook(stat: InputStat) -> Callable:
        def hook(_module: nn.Module, inputs: tuple) -> None:
            stat.add(_tokens(inputs[0], token_mask))

        return hook

    handles = []
    by_owner: dict[int, tuple[nn.Module, dict[str, InputStat]]] = {}
    for layer in layers:
        if isinstance(layer.module, ExpertStack):
            owner = layer.module.owner
            by_owner.setdefault(id(owner), (owner, {}))[1][layer.module.attr] = stats[layer.name]
        else:
            handles.append(layer.module.register_forward_pre_hook(make_hook(stats[layer.name])))
    for owner, owned in by_owner.values():
        handles.append(
            owner.register_forward_pre_hook(_expert_hook(owned, token_mask), with_kwargs=True)
        )
    return handles


def warn_unrouted(layer: PrunableLayer, tokens: torch.Tensor | int, what: str) -> None:
    """Log the experts of ``layer`` that no calibration token reached (``tokens`` per expert)
    and what the pruner did with them (``what``)."""
    if not layer.is_experts or not isinstance(tokens, torch.Tensor):
        return
    idle = (tokens == 0).nonzero().flatten().tolist()
    if idle:
        log.warning("%s: experts %s received no calibration token; %s", layer.name, idle, what)


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
    prune_router: bool = False,
) -> None:
    """Run the block-by-block loop: ``new_stat`` makes each layer's accumulator (per expert for
    a fused expert parameter), ``prune_layer`` prunes a layer (in place) from its accumulated
    statistics. MoE routers are pruned only with ``prune_router``."""
    prefix, blocks = decoder_blocks(model)
    batches = capture_block_inputs(model, calib, batch_size)
    token_mask: list[torch.Tensor] = []  # the current batch's [b, T] mask, read by the hooks
    for index, block in enumerate(tqdm(blocks, desc=desc, leave=False)):
        layers = block_linears(block, prefix, index, prune_router)
        stats = {layer.name: new_stat(layer) for layer in layers}
        handles = record_inputs(layers, stats, token_mask)
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


class CalibratedPruner(LayerMasks):
    """What the layer-wise pruners (Wanda, SparseGPT) share: a granularity or an N:M pattern,
    ``n_calibration`` sequences, and the checks made before any layer is touched."""

    n_calibration: int
    granularity: str
    nm: tuple[int, int] | None
    prune_router: bool = False  # MoE routers stay dense unless asked

    def accepted_sparsities(self) -> tuple[float, ...] | None:
        """0 and (M-N)/M with an N:M pattern; ``None`` (any fraction) without one."""
        return nm_sparsities(self.nm)

    def pattern(self) -> str:
        """``N:M`` when set, else the granularity (the masks' metadata)."""
        return f"{self.nm[0]}:{self.nm[1]}" if self.nm else self.granularity

    def calibration(
        self, model: nn.Module, calib: Calibration | None, sparsity: float
    ) -> Calibration:
        """Checks ``sparsity`` (and that it and every prunable weight of ``model`` fit the N:M
        pattern) and returns the first ``n_calibration`` sequences of ``calib`` (an error when
        there are none)."""
        check_fraction("sparsity", sparsity)
        if self.nm is not None:
            check_nm_sparsity(self.nm, sparsity)
            for layer in prunable_layers(model, self.prune_router):
                check_nm_width(layer.weight.shape[1], *self.nm, layer.name)
        return take(require_calibration(calib, type(self).__name__), self.n_calibration)
