"""One accessor for decoder blocks and their prunable linear layers, for every architecture.

Instead of a table of attribute paths per architecture (``model.model.layers``,
``model.transformer.h``, ``model.model.decoder.layers``, ...), the decoder blocks are found as
the ``nn.ModuleList`` of identical modules that contain linear layers, with as many entries as
``config.num_hidden_layers`` when the model has a config (so a longer list of MoE experts is
not mistaken for them), else the longest such list. This covers Llama, Qwen2, Mistral
(grouped-query attention), GPT-2 (whose linears are ``Conv1D`` with transposed weights) and OPT
without code per architecture; tests build a tiny model of each and prune it.
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


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer a pruner may touch."""
    return isinstance(module, LINEAR_TYPES)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in], a view sharing storage (transposed for ``Conv1D``)."""
    if isinstance(module, nn.Linear):
        return module.weight
    return module.weight.t()  # Conv1D: [in, out] -> [out, in]


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: (prefix, ModuleList), the longest list of same-class blocks with linears."""
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


@dataclass(frozen=True)
class PrunableLayer:
    """A linear layer inside a decoder block."""

    name: str  # full module name, e.g. model.layers.0.mlp.up_proj
    block: int  # index of its decoder block
    module: nn.Module

    @property
    def weight(self) -> torch.Tensor:
        """[out, in] view of the weight."""
        return weight_matrix(self.module)

    @property
    def is_attention_input(self) -> bool:
        """Whether this linear makes per-head queries, keys or values (rows grouped in heads)."""
        return self.name.rsplit(".", 1)[-1] in ATTENTION_INPUT_NAMES

    @property
    def param_name(self) -> str:
        """Name of the weight parameter in ``model.named_parameters()``."""
        return f"{self.name}.weight"


def block_linears(block: nn.Module, prefix: str, index: int) -> list[PrunableLayer]:
    """The linear layers of one decoder block, in module order."""
    return [
        PrunableLayer(f"{prefix}.{index}.{n}", index, m)
        for n, m in block.named_modules()
        if is_linear(m)
    ]


def prunable_layers(model: nn.Module) -> list[PrunableLayer]:
    """Every linear layer inside the decoder blocks (not embeddings, norms or the LM head)."""
    prefix, blocks = decoder_blocks(model)
    return [layer for i, b in enumerate(blocks) for layer in block_linears(b, prefix, i)]
