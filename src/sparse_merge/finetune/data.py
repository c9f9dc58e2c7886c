"""Tokenising prompt/answer examples for training, with the loss on answers only."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from sparse_merge.tasks.base import Example

IGNORE_INDEX = -100  # label value the loss skips


def encode_examples(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_length: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` [N, T]; prompt and padding labels
    are ``IGNORE_INDEX`` so the loss covers the answer and the closing eos only.

    An example longer than ``max_length`` loses the start of its prompt first (a long passage
    or few-shot prompt must not push its answer out); only an answer longer than
    ``max_length`` by itself is cut at its end."""
    rows, labels = [], []
    for e in examples:
        p = tokenizer(e.prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(e.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if max_length:
            a = a[:max_length]
            p = p[len(p) - (max_length - len(a)) :] if len(p) + len(a) > max_length else p
        rows.append(p + a)
        labels.append([IGNORE_INDEX] * len(p) + a)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    label_t = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(rows, labels)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        label_t[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": label_t}
