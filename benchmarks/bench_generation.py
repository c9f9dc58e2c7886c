"""Batched greedy generation (left padding, KV cache, length-sorted batches) against one prompt
at a time, on the same randomly initialised toy Llama: generated tokens per second."""

from __future__ import annotations

import random
import time

import torch

from sparse_merge.models.tokenizer import char_tokenizer
from sparse_merge.models.toy import toy_llama
from sparse_merge.tasks.generation import greedy_generate

N_PROMPTS = 32
MAX_NEW_TOKENS = 24
ARCH = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=256,
)


def _prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghij0123456789+= "
    return ["".join(rng.choices(letters, k=rng.randint(8, 48))) for _ in range(n)]


def _timed(model, tokenizer, prompts: list[str], batch_size: int) -> tuple[list[str], float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = greedy_generate(model, tokenizer, prompts, MAX_NEW_TOKENS, batch_size=batch_size)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def run() -> list[dict]:
    """Rows: generation mode, generated tokens, seconds, tokens/s and speed-up over per-sample."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = char_tokenizer()
    model = toy_llama(tokenizer, seed=0, **ARCH).to(device)
    prompts = _prompts(N_PROMPTS)
    _timed(model, tokenizer, prompts[:4], batch_size=4)  # warm-up
    rows, reference, base = [], None, None
    for batch_size in (1, 8, 32):
        outputs, seconds = _timed(model, tokenizer, prompts, batch_size)
        tokens = sum(len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in outputs)
        reference = reference or outputs
        base = base or tokens / seconds
        rows.append(
            {
                "mode": "per-sample" if batch_size == 1 else f"batched (batch {batch_size})",
                "device": device,
                "prompts": len(prompts),
                "new_tokens": tokens,
                "seconds": round(seconds, 3),
                "tokens_per_s": round(tokens / seconds, 1),
                "speedup": round(tokens / seconds / base, 2),
                "same_outputs": outputs == reference,
            }
        )
    return rows
