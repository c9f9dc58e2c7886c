"""Perplexity of a causal LM on a text, with a sliding window (as in the HF perplexity guide)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase


@torch.inference_mode()
def token_nlls(
    model: nn.Module, input_ids: torch.Tensor, window: int = 256, stride: int = 128
) -> torch.Tensor:
    """Negative log-likelihood of every token after the first [T-1], each scored exactly once.

    Each window holds up to ``window`` tokens: ``stride`` new tokens to score plus the
    ``window - stride`` tokens before them as context.
    """
    if not 0 < stride < window:
        raise ValueError(f"stride={stride} must be in (0, window={window})")
    ids = input_ids.reshape(-1).to(next(model.parameters()).device)  # [T]
    nlls, scored = [], 1  # next token to score; token 0 has no context
    while scored < ids.numel():
        start = max(0, scored - (window - stride))
        end = min(start + window, ids.numel())
        chunk = ids[start:end][None]  # [1, L]
        logits = model(chunk).logits[0, :-1].float()  # [L-1, V], row i predicts token start+i+1
        nll = nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="none")  # [L-1]
        nlls.append(nll[scored - start - 1 :])
        scored = end
    return torch.cat(nlls).cpu() if nlls else torch.zeros(0)


def perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    window: int = 256,
    stride: int = 128,
) -> float:
    """exp(mean NLL) of ``text`` under ``model`` (sliding window, every token scored once)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return math.exp(token_nlls(model, ids, window, stride).double().mean().item())


def perplexity_of_file(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    path: str | Path,
    window: int = 256,
    stride: int = 128,
) -> float:
    """Perplexity of a UTF-8 text file."""
    return perplexity(model, tokenizer, Path(path).read_text(encoding="utf-8"), window, stride)
