"""Importance scores of prunable weights behind one small protocol.

An ``Importance`` maps a model (and calibration data when it needs them) to one score per
prunable weight, ``[out, in]`` per layer, higher meaning more important:

* ``MagnitudeImportance``: ``|W|``.
* ``GradientImportance``: ``|dL/dW|``, with ``dL/dW`` the gradient of the mean language-model
  loss over ``n_batches`` calibration batches.
* ``TaylorImportance``: ``|W * dL/dW|`` (first-order Taylor estimate of the loss change when a
  weight is removed), same gradient.
* ``WandaImportance``: ``|W| * ||X_j||_2`` with input norms measured in one pass of the dense
  model (the ``WandaPruner`` instead re-measures them block by block through the pruned blocks).
* ``RandomImportance``: uniform noise from a seeded generator (the random baseline).

A score that needs gradients and cannot get them (no calibration data, inference mode, a weight
that cannot require grad, a layer the loss does not reach) raises; it never falls back to |W|.

``compute`` scores the model's ``prunable_layers`` (or the ``layers`` it is given, e.g. with
the MoE routers). A fused MoE expert parameter [E, out, in] is scored in its ``[E * out, in]``
view (``PrunableLayer.weight``): its gradient is that of the fused parameter (an expert no
calibration token reaches gets a zero gradient, so gradient and Taylor scores cannot rank its
weights: ties go to the lower index), and Wanda norms are per expert, over the tokens routed to
it (an expert no token reaches is scored ``|W|``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from tqdm.auto import tqdm

from sparse_merge.errors import check_positive
from sparse_merge.models.blocks import PrunableLayer, prunable_layers
from sparse_merge.pruning.base import Calibration
from sparse_merge.pruning.layerwise import require_calibration, take
from sparse_merge.pruning.wanda import dense_input_norms, wanda_scores

log = logging.getLogger(__name__)

# layer parameter name (``PrunableLayer.param_name``) -> scores [out, in]
Scores = dict[str, torch.Tensor]


@runtime_checkable
class Importance(Protocol):
    """One score per prunable weight, in the ``[out, in]`` layout, higher = more important.

    An importance whose layers' scores depend on nothing but the layer (magnitude, random) may
    also have ``each(model, calib, layers)``: the same scores as an iterator, one layer at a
    time, so that a pruner holds one layer's scores (``ScorePruner``)."""

    name: str

    def compute(
        self,
        model: nn.Module,
        calib: Calibration | None,
        layers: list[PrunableLayer] | None = None,
    ) -> Scores:
        """Scores of every prunable layer (or of ``layers``), by weight parameter name."""
        ...


class MagnitudeImportance:
    """``|W|`` (no data needed)."""

    name = "magnitude"
    uses_calibration = False

    def compute(
        self,
        model: nn.Module,
        calib: Calibration | None = None,
        layers: list[PrunableLayer] | None = None,
    ) -> Scores:
        """``|W|`` per prunable layer."""
        layers = prunable_layers(model) if layers is None else layers
        return dict(zip((layer.param_name for layer in layers), self.each(model, calib, layers)))

    @torch.no_grad()
    def each(
        self, model: nn.Module, calib: Calibration | None, layers: list[PrunableLayer]
    ) -> Iterator[torch.Tensor]:
        """The scores of ``layers`` one at a time, in order (a layer's depend on its own weight
        only): a pruner that masks each layer as it comes holds one layer's float32 scores,
        not every layer's."""
        for layer in layers:
            yield layer.weight.abs().float()


class RandomImportance:
    """Uniform random scores from a generator seeded with ``seed``: the same seed gives the same
    scores (and masks) for the same layer shapes, on any device."""

    name = "random"
    uses_calibration = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(check_positive("seed", seed, allow_zero=True))

    def compute(
        self,
        model: nn.Module,
        calib: Calibration | None = None,
        layers: list[PrunableLayer] | None = None,
    ) -> Scores:
        """Random scores per prunable layer, drawn in layer order."""
        layers = prunable_layers(model) if layers is None else layers
        return dict(zip((layer.param_name for layer in layers), self.each(model, calib, layers)))

    def each(
        self, model: nn.Module, calib: Calibration | None, layers: list[PrunableLayer]
    ) -> Iterator[torch.Tensor]:
        """The scores of ``layers`` one at a time, in order, from one generator: the same
        numbers as ``compute`` (``MagnitudeImportance.each``)."""
        g = torch.Generator().manual_seed(self.seed)
        for layer in layers:
            yield torch.rand(layer.weight.shape, generator=g).to(layer.weight.device)


def lm_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Next-token labels for a causal LM: the inputs, with padding ignored (-100)."""
    return input_ids.masked_fill(attention_mask == 0, -100)


def _warn_idle_experts(layer: PrunableLayer, grad: torch.Tensor, who: str) -> None:
    """Log the experts of a fused parameter whose gradient [E, out, in] is all zero (no
    calibration token was routed to them): their scores cannot rank their weights."""
    idle = (grad.flatten(1) == 0).all(-1).nonzero().flatten().tolist()
    if idle:
        log.warning(
            "%s: experts %s of %s got no gradient (no calibration token reached them); their "
            "scores are all zero and the lowest indices are pruned",
            who,
            idle,
            layer.name,
        )


def loss_gradients(
    model: nn.Module,
    calib: Calibration | None,
    n_batches: int,
    batch_size: int,
    who: str,
    layers: list[PrunableLayer] | None = None,
) -> Scores:
    """``dL/dW`` [out, in] of every prunable weight, ``L`` the mean LM loss over the first
    ``n_batches`` calibration batches (targets: ``calib.loss_labels()``, every non-padding token
    unless the calibration says otherwise). Raises when the gradient cannot be had."""
    if calib is None or len(calib) == 0:
        raise ValueError(f"{who} needs calibration batches for gradients; none were passed")
    if torch.is_inference_mode_enabled():
        raise RuntimeError(f"{who} needs gradients but runs under torch.inference_mode()")
    layers = prunable_layers(model) if layers is None else layers
    for layer in layers:
        if not (layer.parameter.is_floating_point() or layer.parameter.is_complex()):
            raise RuntimeError(
                f"{who} needs gradients but {layer.param_name} has dtype "
                f"{layer.parameter.dtype}, which cannot require grad"
            )
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads_before = [p.grad for p in params]
    labels = calib.loss_labels()  # [N, T]
    batches = [
        (ids, attn, labels[i : i + batch_size])
        for (ids, attn), i in zip(calib.batches(batch_size), range(0, len(calib), batch_size))
    ][:n_batches]
    if not any(bool((lab[:, 1:] != -100).any()) for _, _, lab in batches):  # shifted targets
        raise ValueError(
            f"{who}: the calibration batches hold no token to compute the loss on (with "
            "calibration.answer_loss=true every answer was cut off by calibration.length, or "
            "there are no answers): raise calibration.length, or score every token"
        )
    device = next(model.parameters()).device
    try:
        for p in params:  # only the prunable weights get gradients (less memory)
            p.requires_grad_(False)
            p.grad = None
        for layer in layers:
            layer.parameter.requires_grad_(True)
        with torch.enable_grad():
            for ids, attn, lab in tqdm(batches, desc=f"{who}: gradients", leave=False):
                ids, attn, lab = ids.to(device), attn.to(device), lab.to(device)
                out = model(input_ids=ids, attention_mask=attn, labels=lab)
                (out.loss / len(batches)).backward()
        grads: Scores = {}
        for layer in layers:
            g = layer.parameter.grad
            if g is None:
                raise RuntimeError(
                    f"{who}: the loss did not reach {layer.param_name} (no gradient)"
                )
            if layer.is_experts:
                _warn_idle_experts(layer, g, who)
            elif not bool(g.any()):  # ranked by an all-zero score, pruning goes by index
                raise RuntimeError(
                    f"{who}: the gradient of {layer.param_name} is zero everywhere (the loss "
                    "does not depend on it)"
                )
            grads[layer.param_name] = layer.matrix(g.float())  # [out, in]
        return grads
    finally:
        for p, flag, grad in zip(params, flags, grads_before):
            p.requires_grad_(flag)
            p.grad = grad


class GradientImportance:
    """``|dL/dW|`` from ``n_batches`` calibration batches of ``batch_size`` sequences."""

    name = "gradient"

    def __init__(self, n_batches: int = 4, batch_size: int = 8) -> None:
        self.n_batches = int(check_positive("n_batches", n_batches))
        self.batch_size = int(check_positive("batch_size", batch_size))

    def compute(
        self,
        model: nn.Module,
        calib: Calibration | None,
        layers: list[PrunableLayer] | None = None,
    ) -> Scores:
        """``|dL/dW|`` per prunable layer."""
        grads = loss_gradients(
            model, calib, self.n_batches, self.batch_size, "gradient importance", layers
        )
        return {name: g.abs() for name, g in grads.items()}


class TaylorImportance:
    """``|W * dL/dW|`` from ``n_batches`` calibration batches of ``batch_size`` sequences."""

    name = "taylor"

    def __init__(self, n_batches: int = 4, batch_size: int = 8) -> None:
        self.n_batches = int(check_positive("n_batches", n_batches))
        self.batch_size = int(check_positive("batch_size", batch_size))

    def compute(
        self,
        model: nn.Module,
        calib: Calibration | None,
        layers: list[PrunableLayer] | None = None,
    ) -> Scores:
        """``|W * dL/dW|`` per prunable layer."""
        layers = prunable_layers(model) if layers is None else layers
        grads = loss_gradients(
            model, calib, self.n_batches, self.batch_size, "taylor importance", layers
        )
        with torch.no_grad():
            return {
                layer.param_name: (layer.weight.float() * grads[layer.param_name]).abs()
                for layer in layers
            }


class WandaImportance:
    """``|W| * ||X_j||_2`` with the input norms of one pass of the (dense) model over the first
    ``n_calibration`` sequences."""

    name = "wanda"

    def __init__(self, n_calibration: int = 128, batch_size: int = 8) -> None:
        self.n_calibration = int(check_positive("n_calibration", n_calibration))
        self.batch_size = int(check_positive("batch_size", batch_size))

    @torch.no_grad()
    def compute(
        self,
        model: nn.Module,
        calib: Calibration | None,
        layers: list[PrunableLayer] | None = None,
    ) -> Scores:
        """``|W| * ||X_j||`` per prunable layer (per expert: norms of its routed tokens)."""
        calib = take(require_calibration(calib, "wanda importance"), self.n_calibration)
        layers = prunable_layers(model) if layers is None else layers
        routers = any(layer.router for layer in layers)
        stats = dense_input_norms(model, calib, self.batch_size, routers)
        return {
            layer.param_name: wanda_scores(layer.weight, stats[layer.name].norms())
            for layer in layers
        }
