"""Multiple choice by log-likelihood: the option the model finds most likely after the context.

Each (context, option) pair is scored as the sum of the log-probabilities of the option's tokens
given the context (the context's trailing spaces move to the option, as lm-evaluation-harness
does, so the tokenizer sees `` yes`` not ``yes``). ``length_norm`` divides that sum by the
option's length in characters without the one space that separates it from the context
(``char``: lm-evaluation-harness's ``acc_norm``, which divides by the characters of the choice,
its target delimiter not counted), in tokens (``token``), or not at all (``none``). Pairs are run in batches (right
padding), longest first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from sparse_merge.errors import check_choice, check_int
from sparse_merge.tasks.data import DatasetBenchmark, Row
from sparse_merge.tasks.generation import context_length

LENGTH_NORMS = ("char", "token", "none")


@dataclass(frozen=True)
class Choice:
    """A context, its options and the index of the right one."""

    context: str
    options: tuple[str, ...]
    label: int


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, context: str, option: str
) -> tuple[list[int], int]:
    """Token ids of context + option, and how many of the last ones are the option's."""
    stripped = context.rstrip(" ")
    option = context[len(stripped) :] + option
    ctx = tokenizer(stripped)["input_ids"] if stripped else []
    opt = tokenizer(option, add_special_tokens=False)["input_ids"]
    if not ctx:  # nothing to condition the first option token on: start from bos/eos
        ctx = [
            tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ]
    return ctx + opt, len(opt)


@torch.inference_mode()
def option_logprobs(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = False,
) -> list[tuple[float, int]]:
    """(sum of the option's token log-probs, number of option tokens) per (context, option)
    pair, in order. Sequences longer than ``max_length`` (default: the model's context length)
    lose their first tokens."""
    max_length = max_length or context_length(model)
    encoded = [encode_pair(tokenizer, c, o) for c, o in pairs]
    if max_length:
        encoded = [(ids[-(max_length + 1) :], min(n, max_length)) for ids, n in encoded]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="options", leave=False, disable=not progress):
        rows = order[start : start + batch_size]
        width = max(len(encoded[i][0]) for i in rows) - 1
        inputs = torch.full((len(rows), width), pad, dtype=torch.long)
        targets = torch.full((len(rows), width), -1, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids, n = encoded[i]
            t = torch.tensor(ids)
            inputs[r, : len(ids) - 1] = t[:-1]
            mask[r, : len(ids) - 1] = 1
            targets[r, len(ids) - 1 - n : len(ids) - 1] = t[-n:]  # only the option's tokens
        logits = model(input_ids=inputs.to(device), attention_mask=mask.to(device)).logits
        logp = torch.log_softmax(logits.float(), dim=-1)  # [B, W, V]
        keep = targets.to(device) >= 0
        picked = logp.gather(-1, targets.clamp(min=0).to(device)[..., None])[..., 0]  # [B, W]
        sums = (picked * keep).sum(-1).tolist()
        for r, i in enumerate(rows):
            out[i] = (sums[r], encoded[i][1])
    return out


class MultipleChoiceTask:
    """Scores 1 where the highest (length-normalised) option log-likelihood is the right option."""

    datapoints = ("items", "examples")  # indexed by datapoint (``distributed``)

    def __init__(
        self,
        name: str,
        items: Sequence[Choice],
        length_norm: str = "char",
        batch_size: int = 16,
        max_length: int | None = None,
    ) -> None:
        check_choice("length_norm", length_norm, LENGTH_NORMS)
        check_int("batch_size", batch_size, minimum=1)
        self.name, self.items = name, list(items)
        self.length_norm, self.batch_size, self.max_length = length_norm, batch_size, max_length

    def __len__(self) -> int:
        return len(self.items)

    def option_scores(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase
    ) -> list[list[float]]:
        """The normalised log-likelihood of every option of every item."""
        pairs = [(it.context, opt) for it in self.items for opt in it.options]
        raw = iter(
            option_logprobs(
                model, tokenizer, pairs, self.batch_size, self.max_length, progress=True
            )
        )
        scores = []
        for it in self.items:
            row = []
            for opt in it.options:
                total, n_tokens = next(raw)
                if self.length_norm == "char":  # the choice's characters, as lm-eval's acc_norm
                    total /= max(1, len(opt.removeprefix(" ")))
                elif self.length_norm == "token":
                    total /= max(1, n_tokens)
                row.append(total)
            scores.append(row)
        return scores

    def predict(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """The chosen option per item (the first of equal scores)."""
        return [max(range(len(s)), key=s.__getitem__) for s in self.option_scores(model, tokenizer)]

    def score(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
        """[N] bool: the chosen option is the right one."""
        preds = self.predict(model, tokenizer)
        return torch.tensor([p == it.label for p, it in zip(preds, self.items)], dtype=torch.bool)


class ChoiceBenchmark(DatasetBenchmark):
    """A dataset benchmark scored by multiple choice: subclasses say how a row becomes a
    ``Choice`` (``choice``) and pick their default ``length_norm``."""

    default_length_norm = "none"

    def __init__(
        self,
        length_norm: str | None = None,
        batch_size: int = 16,
        **split_options: Any,
    ) -> None:
        length_norm = self.default_length_norm if length_norm is None else length_norm
        check_choice("length_norm", length_norm, LENGTH_NORMS)
        check_int("batch_size", batch_size, minimum=1)
        super().__init__(
            **{"heldout_split": "validation", "n_select": 200, "n_heldout": 1000, **split_options}
        )
        self.length_norm, self.batch_size = length_norm, batch_size

    def choice(self, row: Row) -> Choice:
        """The context, the options and the index of the right one."""
        raise NotImplementedError

    def check_row(self, row: Row) -> None:
        """The row makes a ``Choice`` whose label is one of its options."""
        super().check_row(row)
        item = self.choice(row)
        if not 0 <= item.label < len(item.options):
            raise ValueError(
                f"field 'label' gives option {item.label}, the row has options "
                f"0..{len(item.options) - 1}"
            )

    def make_task(self, name: str, rows: list[Row]) -> MultipleChoiceTask:
        """One ``Choice`` per row, scored by log-likelihood."""
        return MultipleChoiceTask(
            name, [self.choice(r) for r in rows], self.length_norm, self.batch_size
        )
