"""Tiny random causal LMs of every supported architecture, built in-process from a config.

The mixture-of-experts entries (Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE) store
their experts fused, as transformers 5 does: ``experts.gate_up_proj`` [E, 2*I, H] and
``experts.down_proj`` [E, H, I]; each such parameter counts as one prunable layer below (the
router does not count: it stays dense).
"""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

VOCAB = 64

# architecture -> (model class, config, prunable layers per block)
ARCHS = {
    "llama": (
        LlamaForCausalLM,
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
        ),
        7,
    ),
    "qwen2": (
        Qwen2ForCausalLM,
        Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        7,
    ),
    "mistral": (  # grouped-query attention: k/v have fewer heads than q
        MistralForCausalLM,
        MistralConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=None,
        ),
        7,
    ),
    "gpt2": (  # Conv1D linears, weights stored [in, out]
        GPT2LMHeadModel,
        GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
        ),
        4,
    ),
    "opt": (
        OPTForCausalLM,
        OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
        ),
        6,
    ),
    "mixtral": (  # q, k, v, o + experts.gate_up_proj [4, 64, 32] + experts.down_proj [4, 32, 32]
        MixtralForCausalLM,
        MixtralConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=None,
        ),
        6,
    ),
    "qwen2_moe": (  # q, k, v, o + fused experts (2) + shared expert gate/up/down (router-like
        # shared_expert_gate stays dense)
        Qwen2MoeForCausalLM,
        Qwen2MoeConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
        ),
        9,
    ),
    "qwen3_moe": (  # q, k, v, o (with q/k norms) + fused experts (2)
        Qwen3MoeForCausalLM,
        Qwen3MoeConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            moe_intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            num_experts=4,
            num_experts_per_tok=2,
        ),
        6,
    ),
}

MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe")


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of ``arch`` (seeded), in eval mode."""
    cls, config, _ = ARCHS[arch]
    torch.manual_seed(seed)
    return cls(config).eval()
