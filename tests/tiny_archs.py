"""Tiny random causal LMs of every supported architecture, built in-process from a config."""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 64

# architecture -> (model class, config, linears per block)
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
}


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of ``arch`` (seeded), in eval mode."""
    cls, config, _ = ARCHS[arch]
    torch.manual_seed(seed)
    return cls(config).eval()
