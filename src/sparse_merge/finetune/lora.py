"""LoRA on (pruned) models with PEFT: dense, sparse-to-dense and sparse-to-sparse.

One class, three settings of ``mode``:

- ``dense``: plain PEFT LoRA; the merge is ``W' = W + s * B @ A`` and breaks the zeros of a
  pruned base (the baseline).
- ``sparse_to_dense``: the base stays sparse and frozen, the adapters train dense (PEFT's own
  forward); the merge re-applies the mask, ``W' = (W + s * B @ A) * M``.
- ``sparse_to_sparse``: the effective weight is sparse during training too: every forward
  computes ``y = x @ ((W + s * B @ A) * M)^T`` and the merge writes exactly that weight.

The sparse-to-sparse forward (``masked_lora_linear``) folds the update into the weight and runs
one matmul, ``x @ W_eff^T``, instead of the base matmul plus a second one through the masked
update ``x @ ((B @ A) * M)^T``. Its backward recomputes ``W_eff`` (an ``[out, in] x r``
product) instead of keeping it, so no dense ``[out, in]`` tensor per layer lives between the
forward and the backward pass; the weight gradient of the update needs the masked outer
product ``(dy^T x) * M``, one more matmul of the layer's size than dense LoRA. A per-element
sparse (SDDMM) form would do fewer flops at high sparsity but is slower than dense matmuls at
the sparsities used here; ``docs/finetune.md`` has the measurements.

Each LoRA layer knows its keep-mask, so the merge needs no state outside the model. A mask that
is exactly the zero pattern of the pruned weight (every kept weight non-zero, the usual case)
is not stored: ``M = |sign(W)|`` is recomputed where needed (an elementwise pass, no memory
held); otherwise it is a non-persistent bool buffer (one byte per weight).

Mixture-of-experts models store their experts fused, as 3-D parameters of one module
(``experts.gate_up_proj`` [E, 2*I, H], ``experts.down_proj`` [E, H, I]), which are not modules
PEFT can wrap as linears. LoRA reaches them through ``target_parameters`` (PEFT's
``ParamWrapper``: every expert gets its own rank-``r`` pair ``B_e @ A_e``), e.g.
``lora.target_parameters=[experts.gate_up_proj, experts.down_proj]``; naming the experts
module in ``target_modules`` is refused with that hint. In the masked modes the expert
parameter's mask [E, out, in] is applied like a linear's: ``MaskedExpertLora`` computes
``(W + s * B_e @ A_e) * M`` for every expert at once (one ``baddbmm``) in the sparse-to-sparse
forward, and the merge writes exactly that weight (both modes), so pruned expert weights stay
exactly zero. LoRA dropout is not available there (PEFT's restriction: the update is folded
into the weight, so there is no input to drop).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.lora.layer import ParamWrapper
from torch import nn

from sparse_merge.errors import ConfigError, check_choice, check_fraction, check_positive
from sparse_merge.pruning.base import Masks
from sparse_merge.tracking.io import write_atomic_dir

MODES = ("dense", "sparse_to_dense", "sparse_to_sparse")


def linear_names(model: nn.Module) -> list[str]:
    """The names a target module can take in ``model``: the last name part of each linear
    layer (``nn.Linear``, or GPT-2's ``Conv1D``), sorted."""
    from transformers.pytorch_utils import Conv1D

    return sorted(
        {
            n.rsplit(".", 1)[-1]
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear | Conv1D)
        }
    )


def _matches(name: str, target: str) -> bool:
    """PEFT's rule: the whole name, or its last dot-separated parts."""
    return name == target or name.endswith(f".{target}")


def check_target_modules(
    target_modules: Sequence[str], model: nn.Module, where: str, key: str = "lora.target_modules"
) -> None:
    """Every entry of ``target_modules`` names a module of ``model`` (PEFT's rule: the whole
    name, or its last dot-separated parts: ``_matches``); ``where`` says when the check ran (on
    the meta device before the model loads, or on the loaded model)."""
    names = [n for n, _ in model.named_modules() if n]
    missing = [t for t in target_modules if not any(_matches(n, t) for n in names)]
    if missing:
        raise ConfigError(
            key,
            list(target_modules),
            f"names of the model's linear layers, {', '.join(linear_names(model))} "
            f"({', '.join(missing)} names none; {where})",
        )


def check_adapter_targets(adapter: Any, model: nn.Module) -> None:
    """An adapter's ``target_modules`` (when it has them) against a loaded ``model``: the
    pipeline's check right after the model loads, before pruning, for models whose config
    ``config.check_adapter_targets`` could not read before loading."""
    targets = getattr(adapter, "target_modules", None)
    if targets:
        check_target_modules(targets, model, "checked on the loaded model, before pruning")


def meta_model(config: Any) -> nn.Module:
    """The causal LM of a transformers ``config`` on the ``meta`` device: its modules and
    shapes, no weights (what ``check_target_modules`` needs before any model loads)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def effective_weight(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    dtype: torch.dtype,
    with_base: bool = True,
) -> torch.Tensor:
    """``(W + s * B @ A) * M`` [out, in] in ``dtype`` (``with_base=False``: ``(s * B @ A) * M``).

    ``mask`` None means ``M = (W != 0)``, for layers whose mask is exactly the zero pattern of
    their pruned weight. The same function computes the training forward's weight and the
    merged weight, so the merged model reproduces the trained one bit for bit when both run in
    fp32 (a half-precision base is merged in fp32 and rounded once).
    """
    w = weight.to(dtype)
    a, b = lora_a.to(dtype), lora_b.to(dtype)  # [r, in], [out, r]
    keep = _keep(w, mask)
    if with_base:
        return torch.addmm(w, b, a, alpha=scaling).mul_(keep)  # one pass: W + s * B @ A
    return torch.mm(b, a).mul_(keep).mul_(scaling)


def _keep(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The keep-mask as 0/1 in ``weight``'s dtype; ``|sign(W)|`` when ``mask`` is None (a few
    times faster than ``W != 0`` followed by a bool multiply on CPU)."""
    if mask is None:
        return weight.sign().abs_()
    return mask.to(weight.dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for ``x``'s device, else ``x``'s dtype."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


class _MaskedLoraLinear(torch.autograd.Function):
    """``y = x @ ((W + s * B @ A) * M)^T`` keeping only ``x`` (and the weights) for backward."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, mask, scaling, with_base):  # noqa: D102
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            w = effective_weight(weight, lora_a, lora_b, mask, scaling, dtype, with_base)
            y = F.linear(x.to(dtype), w)  # [..., out]
        ctx.save_for_backward(x, weight, lora_a, lora_b, mask)
        ctx.scaling, ctx.dtype, ctx.with_base = scaling, dtype, with_base
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        x, weight, lora_a, lora_b, mask = ctx.saved_tensors
        s, dtype = ctx.scaling, ctx.dtype
        grad_x = grad_a = grad_b = None
        with torch.autocast(dy.device.type, enabled=False):
            dy = dy.to(dtype)
            if ctx.needs_input_grad[0]:  # W_eff recomputed, not kept from the forward
                w = effective_weight(weight, lora_a, lora_b, mask, s, dtype, ctx.with_base)
                grad_x = (dy @ w).to(x.dtype)  # [..., in]
                del w
            if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
                dy2 = dy.reshape(-1, dy.shape[-1])  # [N, out]
                x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # [N, in]
                g = (dy2.t() @ x2).mul_(
                    _keep(weight.to(dtype), mask)
                )  # [out, in]: masked dL/dW_eff
                grad_b = (g @ lora_a.to(dtype).t()).mul_(s).to(lora_b.dtype)  # [out, r]
                grad_a = (lora_b.to(dtype).t() @ g).mul_(s).to(lora_a.dtype)  # [r, in]
        return grad_x, None, grad_a, grad_b, None, None, None


def masked_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    with_base: bool = True,
) -> torch.Tensor:
    """``x @ ((W + s * B @ A) * M)^T`` [..., out] (``with_base=False``: the update alone);
    ``mask`` None is ``W != 0``. ``W`` is frozen; gradients flow to ``x``, ``A`` [r, in] and
    ``B`` [out, r]."""
    return _MaskedLoraLinear.apply(x, weight, lora_a, lora_b, mask, scaling, with_base)


def _checked_mask(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """``(keep_mask, mask_source)`` of a layer whose ``weight`` must already be zero where
    ``mask`` (its shape) is False: ``(None, "weight")`` when the weight's nonzeros are the mask,
    else the mask itself as a bool buffer (some kept weights are exactly zero)."""
    if mask.shape != weight.shape:
        raise ValueError(f"mask {tuple(mask.shape)} != weight {tuple(weight.shape)}")
    mask = mask.to(device=weight.device, dtype=torch.bool)
    if bool((weight[~mask] != 0).any()):
        raise ValueError("the base weight is not zero where the mask is False; prune first")
    if torch.equal(weight != 0, mask):
        return None, "weight"
    return mask, "buffer"


class MaskedLoraLinear(PeftLoraLinear):
    """PEFT's LoRA linear layer that knows the keep-mask of its base weight.

    When the mask is exactly the zero pattern of the pruned base weight (the usual case: every
    kept weight is non-zero), nothing is stored and ``M = (W != 0)`` is recomputed where
    needed; otherwise the mask is kept as a bool buffer (one byte per weight). With
    ``sparse_forward`` the forward uses the masked effective weight (sparse-to-sparse),
    otherwise PEFT's dense-update forward (sparse-to-dense). Layers without a mask, and the
    multi-adapter or disabled-adapter cases, use PEFT's forward.
    """

    sparse_forward = False
    mask_source: str | None = None  # None (no mask), "weight" (W != 0) or "buffer"

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name, **kwargs)
        self.register_buffer("keep_mask", None, persistent=False)  # [out, in] bool

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor | None, sparse_forward: bool) -> None:
        """Attach the base weight's keep-mask (in the weight's layout); the base weight must
        already be zero where the mask is False."""
        self.sparse_forward = sparse_forward
        self.keep_mask, self.mask_source = None, None
        if mask is None:
            return
        self.keep_mask, self.mask_source = _checked_mask(self.get_base_layer().weight, mask)

    def keep(self) -> torch.Tensor | None:
        """The keep-mask [out, in] (computed from the weight when it is not stored)."""
        if self.mask_source is None:
            return None
        return self.keep_mask if self.keep_mask is not None else self.get_base_layer().weight != 0

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Masked forward for the single active adapter; PEFT's forward otherwise."""
        active = self.active_adapters
        if (
            not self.sparse_forward
            or self.mask_source is None
            or self.disable_adapters
            or self.merged
            or kwargs.get("adapter_names") is not None
            or len(active) != 1
            or active[0] not in self.lora_A
        ):
            return super().forward(x, *args, **kwargs)
        name = active[0]
        base = self.get_base_layer()
        a, b = self.lora_A[name].weight, self.lora_B[name].weight  # [r, in], [out, r]
        s, dropout = self.scaling[name], self.lora_dropout[name]
        if isinstance(dropout, nn.Identity) or not self.training:
            y = masked_lora_linear(x, base.weight, a, b, self.keep_mask, s)  # one matmul
        else:  # dropout feeds the update only, as in PEFT: two matmuls
            y = base(x, *args, **kwargs)
            update = masked_lora_linear(dropout(x), base.weight, a, b, self.keep_mask, s, False)
            return y + update.to(y.dtype)
        if base.bias is not None:
            y = y + base.bias.to(y.dtype)
        return y


def _lora_layers(model: nn.Module) -> list[MaskedLoraLinear]:
    return [m for m in model.modules() if isinstance(m, MaskedLoraLinear)]


def expert_factors(
    layer: ParamWrapper, adapter: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)``, [E, out, r] and [E, r, in] in ``dtype``, of the LoRA update of a fused
    [E, out, in] expert parameter: ``delta_e = s * B[e] @ A[e]`` (PEFT's ``ParamWrapper``
    stores A as [E * r, in] and B as [out, r * E], expert-minor)."""
    if not getattr(layer, "_did_swap_in_out_features", False):
        raise NotImplementedError(
            f"{layer.parameter_name}: only expert weights stored [E, out, in] are supported"
        )
    a = layer.lora_A[adapter].weight  # [E * r, in]
    b = layer.lora_B[adapter].weight  # [out, r * E]
    n = layer.num_experts
    a = a.reshape(n, -1, a.shape[-1])  # [E, r, in]
    b = b.reshape(b.shape[0], -1, n).permute(2, 0, 1)  # [E, out, r]
    return b.to(dtype), a.to(dtype)


def expert_effective_weight(
    weight: torch.Tensor,
    lora_b: torch.Tensor,
    lora_a: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``(W + s * B @ A) * M`` [E, out, in] in ``dtype`` for every expert at once (one
    ``baddbmm``); ``mask`` None means ``M = (W != 0)`` (as in ``effective_weight``)."""
    w = weight.to(dtype)
    keep = _keep(w, mask)
    return torch.baddbmm(w, lora_b.to(dtype), lora_a.to(dtype), alpha=scaling).mul_(keep)


class _MaskedExpertProxy(nn.Module):
    """Parametrization of a fused expert parameter: ``W -> (W + s * B @ A) * M``."""

    def __init__(self, lora_b, lora_a, mask, scaling) -> None:
        super().__init__()
        self.lora_b, self.lora_a, self.mask, self.scaling = lora_b, lora_a, mask, scaling

    def forward(self, weight: torch.Tensor) -> torch.Tensor:  # noqa: D102
        # a parametrization may not change the dtype: computed in the weight's, no autocast
        with torch.autocast(weight.device.type, enabled=False):
            return expert_effective_weight(
                weight, self.lora_b, self.lora_a, self.mask, self.scaling, weight.dtype
            )


class MaskedExpertLora(ParamWrapper):
    """PEFT's LoRA on a fused 3-D expert parameter [E, out, in] (``target_parameters``) that
    knows the parameter's keep-mask, like ``MaskedLoraLinear`` for a linear: the mask is
    ``W != 0`` when that is exactly it (nothing stored), else a bool buffer. With
    ``sparse_forward`` every forward uses ``(W + s * B_e @ A_e) * M`` (sparse-to-sparse);
    otherwise PEFT's dense update (sparse-to-dense).

    PEFT builds its own ``ParamWrapper`` (it nests them by class name to target two parameters
    of one module, so a subclass cannot be dispatched); ``attach`` turns one into this class
    after injection (methods and the mask only, no other state changes)."""

    sparse_forward = False
    mask_source: str | None = None  # None (no mask), "weight" (W != 0) or "buffer"

    @classmethod
    def attach(cls, layer: ParamWrapper) -> MaskedExpertLora:
        """``layer``, now of this class, with no mask yet."""
        layer.__class__ = cls
        layer.register_buffer("keep_mask", None, persistent=False)  # [E, out, in] bool
        return layer  # type: ignore[return-value]

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor | None, sparse_forward: bool) -> None:
        """Attach the parameter's keep-mask [E, out, in]; the parameter must already be zero
        where the mask is False."""
        self.sparse_forward = sparse_forward
        self.keep_mask, self.mask_source = None, None
        if mask is None:
            return
        self.keep_mask, self.mask_source = _checked_mask(self.get_param(), mask)

    def keep(self) -> torch.Tensor | None:
        """The keep-mask [E, out, in] (computed from the weight when it is not stored)."""
        if self.mask_source is None:
            return None
        return self.keep_mask if self.keep_mask is not None else self.get_param() != 0

    @contextmanager
    def _activate_lora(self, active_adapters: list[str]):
        adapters = [a for a in active_adapters if a in self.lora_A]
        if not self.sparse_forward or self.mask_source is None or len(adapters) != 1:
            with super()._activate_lora(active_adapters):
                yield
            return
        name = adapters[0]
        param = self.get_param()
        lora_b, lora_a = expert_factors(self, name, param.dtype)
        proxy = _MaskedExpertProxy(lora_b, lora_a, self.keep_mask, self.scaling[name])
        base = self.get_base_layer()
        requires_grad = param.requires_grad
        nn.utils.parametrize.register_parametrization(base, self.parameter_name, proxy)
        base.parametrizations[self.parameter_name].original.requires_grad_(requires_grad)
        try:
            with nn.utils.parametrize.cached():
                yield
        finally:
            self._remove_parametrizations()

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``(W + s * B @ A) * M`` of the single active adapter, in the parameter's dtype
        (computed in fp32, or fp64 for an fp64 parameter)."""
        (name,) = self.active_adapters
        param = self.get_param()
        dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
        lora_b, lora_a = expert_factors(self, name, dtype)
        merged = expert_effective_weight(
            param, lora_b, lora_a, self.keep_mask, self.scaling[name], dtype
        )
        return merged.to(param.dtype)


def _expert_layers(model: nn.Module) -> list[MaskedExpertLora]:
    return [m for m in model.modules() if isinstance(m, MaskedExpertLora)]


def _expert_param_names(model: nn.Module) -> list[str]:
    """Full names (``module.attr``) of the fused 3-D expert parameters of ``model``."""
    from sparse_merge.models.blocks import expert_params

    return [f"{n}.{a}" for n, m in model.named_modules() for a in expert_params(m)]


def check_expert_targets(
    target_modules: Sequence[str], target_parameters: Sequence[str], model: nn.Module
) -> None:
    """LoRA on fused MoE experts goes through ``target_parameters``: a ``target_modules`` entry
    that names an experts module (PEFT cannot wrap it) and a ``target_parameters`` entry that
    names no fused expert parameter are ``ConfigError``s saying what to write instead."""
    from sparse_merge.models.blocks import is_experts

    expert_modules = [n for n, m in model.named_modules() if n and is_experts(m)]
    names = _expert_param_names(model)
    short = sorted({n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in names})
    hits = [t for t in target_modules if any(_matches(n, t) for n in expert_modules)]
    if hits:
        raise ConfigError(
            "lora.target_modules",
            list(target_modules),
            f"linear layers only: {', '.join(hits)} names fused MoE expert modules, whose "
            "3-D weights PEFT cannot wrap as linears; put LoRA on them with "
            f"lora.target_parameters=[{', '.join(short)}]",
        )
    missing = [t for t in target_parameters if not any(_matches(n, t) for n in names)]
    if missing:
        hint = f"[{', '.join(short)}]" if short else "none: the model has no fused experts"
        raise ConfigError(
            "lora.target_parameters",
            list(target_parameters),
            f"fused MoE expert weights ({', '.join(missing)} names none; this model has "
            f"{hint}); linear layers go in lora.target_modules",
        )


class LoraAdapter:
    """LoRA adapters (PEFT) on every ``target_modules`` linear layer; ``mode`` picks dense,
    sparse-to-dense or sparse-to-sparse (see the module docstring). ``A`` is initialised from
    ``init_seed`` (``B`` starts at zero, so the wrapped model starts equal to the base).
    ``mask_path``: a saved mask directory used instead of the pipeline's pruner;
    ``mask_check=False`` applies its masks even when their ``source_hash`` is another model's."""

    def __init__(
        self,
        mode: str = "dense",
        r: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
        mask_path: str | None = None,
        init_seed: int = 0,
        mask_check: bool = True,
        target_parameters: Sequence[str] | None = None,
    ) -> None:
        self.mode = check_choice("mode", mode, MODES)
        self.r = int(check_positive("r", r))
        self.lora_alpha = float(check_positive("lora_alpha", lora_alpha))
        self.lora_dropout = check_fraction("lora_dropout", lora_dropout)
        if not target_modules:
            raise ConfigError("target_modules", target_modules, "one or more module names")
        self.target_modules = list(target_modules)
        self.target_parameters = list(target_parameters or [])
        if self.target_parameters and self.lora_dropout:
            raise ConfigError(
                "lora_dropout",
                lora_dropout,
                "0 with lora.target_parameters (PEFT folds the expert update into the weight, "
                "so there is no input to drop)",
            )
        self.mask_path = mask_path
        self.mask_check = bool(mask_check)
        self.init_seed = init_seed
        self.name = mode

    @property
    def scaling(self) -> float:
        """``s = lora_alpha / r``."""
        return self.lora_alpha / self.r

    def peft_config(self) -> LoraConfig:
        """The PEFT config (with the masked layer class for the masked modes; fused expert
        parameters get PEFT's ``ParamWrapper``, made a ``MaskedExpertLora`` by ``wrap``)."""
        config = LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.target_modules,
            target_parameters=self.target_parameters or None,
            task_type="CAUSAL_LM",
        )
        if self.mode != "dense":
            config._register_custom_module({nn.Linear: MaskedLoraLinear})
        return config

    def wrap(self, model: nn.Module, masks: Masks | None) -> nn.Module:
        """A ``PeftModel`` over ``model``; the masked modes attach each layer's keep-mask."""
        if self.mode != "dense" and masks is None:
            raise ValueError(f"lora.mode={self.mode!r} needs masks (prune or give mask_path)")
        check_target_modules(self.target_modules, model, "checked on the loaded model")
        check_expert_targets(self.target_modules, self.target_parameters, model)
        by_module = {}
        by_param = {}  # (id(experts module), attribute) -> mask of a fused expert parameter
        if masks:
            modules = dict(model.named_modules())
            for param_name, mask in masks.items():
                module = modules.get(param_name.removesuffix(".weight"))
                if module is not None:
                    by_module[id(module)] = mask
                owner, _, attr = param_name.rpartition(".")
                if mask.dim() == 3 and owner in modules:
                    by_param[(id(modules[owner]), attr)] = mask
        with torch.random.fork_rng(devices=[]):  # PEFT draws A from the global RNG
            torch.manual_seed(self.init_seed)
            peft_model = get_peft_model(model, self.peft_config())
        if self.mode != "dense":
            layers = _lora_layers(peft_model)
            for layer in layers:
                mask = by_module.pop(id(layer.get_base_layer()), None)
                layer.set_mask(mask, sparse_forward=self.mode == "sparse_to_sparse")
            wrappers = [m for m in peft_model.modules() if type(m) is ParamWrapper]
            for expert_layer in map(MaskedExpertLora.attach, wrappers):
                key = (id(expert_layer.get_base_layer()), expert_layer.parameter_name)
                mask = by_param.pop(key, None)
                expert_layer.set_mask(mask, sparse_forward=self.mode == "sparse_to_sparse")
            adapted = {id(m) for n, m in model.named_modules() if n.endswith(".base_layer")}
            missed = [k for k in by_module if k in adapted]
            if missed:  # a targeted, masked layer that is not an nn.Linear (e.g. GPT-2 Conv1D)
                raise NotImplementedError(
                    f"lora.mode={self.mode!r} supports nn.Linear layers; {len(missed)} masked "
                    "target layers are of another type"
                )
        return peft_model

    @torch.no_grad()
    def merge(self, model: nn.Module) -> nn.Module:
        """The base model with the update merged; the masked modes write ``(W + s*B@A) * M``
        (computed in fp32, then cast to the weight's dtype), so masked weights are exactly 0."""
        if not isinstance(model, PeftModel):
            raise TypeError(f"expected the PeftModel returned by wrap, got {type(model).__name__}")
        if self.mode == "dense":
            return model.merge_and_unload()
        for expert_layer in _expert_layers(model):
            if expert_layer.mask_source is None:
                expert_layer.merge()
                continue
            param = expert_layer.get_param()
            param.data = expert_layer.merged_weight()
        for layer in _lora_layers(model):
            if layer.mask_source is None:
                layer.merge()
                continue
            (name,) = layer.active_adapters
            base = layer.get_base_layer()
            merged = effective_weight(
                base.weight,
                layer.lora_A[name].weight,
                layer.lora_B[name].weight,
                layer.keep_mask,
                layer.scaling[name],
                torch.float32 if base.weight.dtype != torch.float64 else torch.float64,
            )
            base.weight.data = merged.to(base.weight.dtype)
        return model.unload()

    def save(self, model: nn.Module, directory: str | Path) -> Path:
        """The adapter in PEFT format (``PeftModel.from_pretrained`` loads it); the masks are
        saved with the run, and loading the adapter with plain PEFT gives the dense update."""
        if not isinstance(model, PeftModel):
            raise TypeError(f"expected the PeftModel returned by wrap, got {type(model).__name__}")
        return write_atomic_dir(directory, lambda tmp: model.save_pretrained(str(tmp)))

    def __repr__(self) -> str:
        return (
            f"LoraAdapter(mode={self.mode}, r={self.r}, alpha={self.lora_alpha}, "
            f"dropout={self.lora_dropout}, targets={self.target_modules}"
            + (f", parameters={self.target_parameters}" if self.target_parameters else "")
            + ")"
        )
