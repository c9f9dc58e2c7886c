"""One accessor for decoder blocks and their prunable weight matrices, for every architecture.

Instead of a table of attribute paths per architecture (``model.model.layers``,
``model.transformer.h``, ``model.model.decoder.layers``, ...), the decoder blocks are found as
the ``nn.ModuleList`` of identical modules that contain linear layers, with as many entries as
``config.num_hidden_layers`` when the model has a config (so a longer list of MoE experts is
not mistaken for them), else the longest such list. This covers Llama, Qwen2, Mistral
(grouped-query attention), GPT-2 (whose linears are ``Conv1D`` with transposed weights), OPT,
and the mixture-of-experts models Mixtral, Qwen2-MoE and Qwen3-MoE without code per
architecture; tests build a tiny model of each and prune it.

Mixture of experts. transformers 5 stores the experts of an MoE block fused, as 3-D parameters
of one module (``experts.gate_up_proj`` [E, 2*I, H] and ``experts.down_proj`` [E, H, I]; each
expert's slice is ``[out, in]``, the layout ``F.linear`` takes, and ``gate_up_proj[e]`` holds
the gate projection in rows ``:I`` and the up projection in rows ``I:``). Such a parameter is
one ``PrunableLayer`` whose ``weight`` is the ``[E * out, in]`` view of it (a view: the slices
stacked by rows), split into *units*: the row ranges that are each pruned as one ``nn.Linear``
would be, i.e. each expert's gate, up and down projection on its own. The router (the block's
``gate``, a ``[E, H]`` weight, and Qwen2-MoE's ``shared_expert_gate``) is left out unless
``prune_router=True``; Qwen2-MoE's always-active shared expert is an ordinary MLP of linears.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

try:  # GPT-2 style Conv1D: weight stored as [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers always provides it
    Conv1D = ()  # type: ignore[assignment]

LINEAR_TYPES: tuple[type, ...] = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)

# 3-D expert parameters of a fused MoE experts module, in the order they are applied
EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj")


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer a pruner may touch."""
    return isinstance(module, LINEAR_TYPES)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in], a view sharing storage (transposed for ``Conv1D``)."""
    if isinstance(module, Conv1D):
        return module.weight.t()  # Conv1D: [in, out] -> [out, in]
    return module.weight  # nn.Linear, or a router holding a [experts, hidden] weight


def expert_params(module: nn.Module) -> list[str]:
    """The fused 3-D expert parameters of ``module`` (``gate_up_proj``, ``up_proj``,
    ``down_proj``, [E, out, in] each), or ``[]`` when it is not a fused experts module."""
    n = getattr(module, "num_experts", None)
    if not isinstance(n, int):
        return []
    return [
        name
        for name in EXPERT_PARAMS
        if isinstance(p := module._parameters.get(name), nn.Parameter)
        and p.dim() == 3
        and p.shape[0] == n
    ]


def is_experts(module: nn.Module) -> bool:
    """Whether ``module`` holds fused 3-D expert weights (transformers 5 MoE experts)."""
    return bool(expert_params(module))


def check_expert_layout(module: nn.Module, where: str) -> None:
    """Refuse a fused expert layout this code does not slice correctly: weights stored
    transposed ([E, in, out]) or gate and up projections interleaved row by row."""
    if getattr(module, "is_transposed", False):
        raise NotImplementedError(
            f"{where} ({type(module).__name__}) stores its expert weights transposed "
            "([E, in, out]); only the [E, out, in] layout of Mixtral and Qwen-MoE is supported"
        )
    if getattr(module, "has_gate", True) and not getattr(module, "is_concatenated", True):
        raise NotImplementedError(
            f"{where} ({type(module).__name__}) interleaves gate and up rows; only the "
            "concatenated [gate; up] layout is supported"
        )


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: (prefix, ModuleList), the longest list of same-class blocks with
    linears."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(m) for m in module}
        if len(kinds) != 1 or not any(is_linear(m) for m in module[0].modules()):
            continue
        if len(module) == n_layers:
            return name, module
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise ValueError(f"no decoder blocks found in {type(model).__name__}")
    return best


# Last name of the linears that project the block input to per-head queries, keys or values
# (their output rows come in heads of ``head_dim``), across the supported architectures.
ATTENTION_INPUT_NAMES = ("q_proj", "k_proj", "v_proj", "c_attn", "query_key_value", "qkv_proj")


def head_dim(model: nn.Module) -> int:
    """Size of one attention head (``config.head_dim`` or hidden size / number of heads)."""
    config = model.config
    explicit = getattr(config, "head_dim", None)
    return int(explicit or config.hidden_size // config.num_attention_heads)


class ExpertStack:
    """One fused 3-D expert parameter seen as a layer: ``weight`` is the parameter itself
    [E, out, in] (what ``PrunableLayer.module.weight`` is for a linear), ``owner`` the experts
    module that holds it (hooks go there), ``attr`` its attribute name."""

    def __init__(self, owner: nn.Module, attr: str) -> None:
        self.owner, self.attr = owner, attr

    @property
    def weight(self) -> nn.Parameter:
        """The fused parameter [E, out, in]."""
        return getattr(self.owner, self.attr)

    @property
    def num_experts(self) -> int:
        """E."""
        return int(self.weight.shape[0])

    @property
    def parts(self) -> tuple[tuple[int, int], ...]:
        """Row ranges of one expert's [out, in] slice that are separate projections: gate and
        up halves of a fused ``gate_up_proj``, the whole slice otherwise."""
        out = int(self.weight.shape[1])
        if self.attr == "gate_up_proj" and getattr(self.owner, "has_gate", True):
            return ((0, out // 2), (out // 2, out))
        return ((0, out),)

    def part_names(self) -> tuple[str, ...]:
        """Name of each of ``parts``: ``gate``/``up`` for a fused ``gate_up_proj``."""
        return ("gate", "up") if len(self.parts) == 2 else ("",)

    def __repr__(self) -> str:
        return f"ExpertStack({type(self.owner).__name__}.{self.attr}, {tuple(self.weight.shape)})"


@dataclass(frozen=True)
class Unit:
    """Rows ``start:stop`` of a layer's ``[rows, in]`` weight that are pruned as one matrix
    (the whole weight of a linear; one expert's gate, up or down projection of a fused
    parameter). ``expert``: the expert index, None outside experts."""

    start: int
    stop: int
    expert: int | None = None
    part: str = ""  # "gate" / "up" for the halves of a fused gate_up_proj

    @property
    def rows(self) -> slice:
        """The unit's rows of the layer's ``[rows, in]`` weight."""
        return slice(self.start, self.stop)


@dataclass(frozen=True)
class PrunableLayer:
    """A prunable weight matrix inside a decoder block: a linear layer, a fused expert
    parameter (``module`` an ``ExpertStack``), or, when asked for, an MoE router."""

    name: str  # full module name, e.g. model.layers.0.mlp.up_proj (+ .gate_up_proj for experts)
    block: int  # index of its decoder block
    module: nn.Module | ExpertStack
    router: bool = False  # an MoE router (only listed with prune_router=True)

    @property
    def is_experts(self) -> bool:
        """Whether this is a fused 3-D expert parameter [E, out, in]."""
        return isinstance(self.module, ExpertStack)

    @property
    def num_experts(self) -> int | None:
        """E for a fused expert parameter, None otherwise."""
        return self.module.num_experts if isinstance(self.module, ExpertStack) else None

    @property
    def parameter(self) -> nn.Parameter:
        """The weight parameter in its own layout ([out, in]; [in, out] for ``Conv1D``;
        [E, out, in] for experts)."""
        return self.module.weight

    @property
    def weight(self) -> torch.Tensor:
        """[out, in] view of the weight ([E * out, in] for experts: the slices by rows), sharing
        storage: pruners write through it (a layout that cannot be viewed so raises)."""
        if isinstance(self.module, ExpertStack):
            p = self.parameter
            return p.view(-1, p.shape[-1])
        return weight_matrix(self.module)

    def matrix(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor in the parameter's layout (a gradient, a mask) as the ``[rows, in]``
        matrix ``weight`` is (a view where the layout allows, else a copy)."""
        if isinstance(self.module, ExpertStack):
            return t.reshape(-1, t.shape[-1])
        return t.t() if isinstance(self.module, Conv1D) else t

    def param_layout(self, m: torch.Tensor) -> torch.Tensor:
        """A ``[rows, in]`` tensor (a keep-mask) in the parameter's own layout."""
        if isinstance(self.module, ExpertStack):
            return m.reshape(self.parameter.shape)
        return m.t() if isinstance(self.module, Conv1D) else m

    @property
    def units(self) -> tuple[Unit, ...]:
        """The row ranges of ``weight`` pruned each on its own (see ``Unit``)."""
        if not isinstance(self.module, ExpertStack):
            return (Unit(0, int(self.weight.shape[0])),)
        out = int(self.parameter.shape[1])
        names = self.module.part_names()
        return tuple(
            Unit(e * out + a, e * out + b, e, name)
            for e in range(self.module.num_experts)
            for (a, b), name in zip(self.module.parts, names)
        )

    @property
    def is_attention_input(self) -> bool:
        """Whether this linear makes per-head queries, keys or values (rows grouped in heads)."""
        return not self.is_experts and self.name.rsplit(".", 1)[-1] in ATTENTION_INPUT_NAMES

    @property
    def param_name(self) -> str:
        """Name of the weight parameter in ``model.named_parameters()``."""
        return self.name if self.is_experts else f"{self.name}.weight"

    def expert_name(self, expert: int) -> str:
        """The name of one expert's slice, ``model.layers.0.mlp.experts.gate_up_proj[3]``."""
        return f"{self.name}[{expert}]"


def _is_router(parent: nn.Module, child_name: str, child: nn.Module) -> bool:
    """A router of an MoE block: a child of a module that holds experts (``experts``) that has
    a 2-D weight of its own and is not the experts (Mixtral's and Qwen's ``gate``,
    Qwen2-MoE's ``shared_expert_gate``). A shared expert is an MLP (no weight of its own)."""
    experts = getattr(parent, "experts", None)
    if not isinstance(experts, nn.Module) or child is experts or child_name == "experts":
        return False
    w = child._parameters.get("weight")
    return isinstance(w, nn.Parameter) and w.dim() == 2


def block_linears(
    block: nn.Module, prefix: str, index: int, prune_router: bool = False
) -> list[PrunableLayer]:
    """The prunable weights of one decoder block, in module order: its linears (MoE routers
    only with ``prune_router``) and each fused 3-D expert parameter."""
    layers = []
    routers = {
        id(child)
        for _, parent in block.named_modules()
        for child_name, child in parent.named_children()
        if _is_router(parent, child_name, child)
    }
    for n, m in block.named_modules():
        name = f"{prefix}.{index}.{n}"
        if id(m) in routers:
            if prune_router:
                layers.append(PrunableLayer(name, index, m, router=True))
        elif is_linear(m):
            layers.append(PrunableLayer(name, index, m))
        elif is_experts(m):
            check_expert_layout(m, name)
            layers.extend(
                PrunableLayer(f"{name}.{attr}", index, ExpertStack(m, attr))
                for attr in expert_params(m)
            )
    return layers


def prunable_layers(model: nn.Module, prune_router: bool = False) -> list[PrunableLayer]:
    """Every prunable weight inside the decoder blocks (not embeddings, norms or the LM head;
    MoE routers only with ``prune_router``)."""
    prefix, blocks = decoder_blocks(model)
    return [
        layer for i, b in enumerate(blocks) for layer in block_linears(b, prefix, i, prune_router)
    ]
