"""Batched greedy generation and the exact-match task built on it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from sparse_merge.tasks.base import Example


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def greedy_generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 64,
    stop: Sequence[str] = (),
) -> list[str]:
    """Greedy completions of ``prompts`` (left padding, KV cache), cut at eos or a stop string."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(
                list(prompts[start : start + batch_size]),
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            ).to(_device(model))
            generated = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )  # [B, T + new]
            new = generated[:, batch["input_ids"].shape[1] :]
            for text in tokenizer.batch_decode(new, skip_special_tokens=True):
                for s in stop:
                    text = text.split(s, 1)[0]
                outputs.append(text)
    finally:
        tokenizer.padding_side = side
    return outputs


def exact_match(prediction: str, answer: str) -> bool:
    """Whitespace-insensitive exact match."""
    return prediction.strip() == answer.strip()


class ExactMatchTask:
    """Scores 1 when the greedy completion of a prompt equals its answer, else 0."""

    def __init__(
        self,
        name: str,
        examples: Sequence[Example],
        max_new_tokens: int,
        batch_size: int = 64,
        stop: Sequence[str] = ("\n",),
        match: Callable[[str, str], bool] = exact_match,
    ) -> None:
        self.name = name
        self.examples = tuple(examples)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.stop = tuple(stop)
        self.match = match

    def __len__(self) -> int:
        return len(self.examples)

    def predict(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        """The model's completions, in datapoint order."""
        prompts = [e.prompt for e in self.examples]
        return greedy_generate(
            model, tokenizer, prompts, self.max_new_tokens, self.batch_size, self.stop
        )

    def score(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
        """[N] bool: exact match per datapoint."""
        preds = self.predict(model, tokenizer)
        return torch.tensor(
            [self.match(p, e.answer) for p, e in zip(preds, self.examples)], dtype=torch.bool
        )
