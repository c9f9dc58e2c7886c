"""Language modelling on a text corpus: one datapoint per passage, scored by 1 / perplexity.

The corpus (a ``.txt`` file, rows with a ``text_field`` in JSON/JSONL/parquet/CSV, or a hub
dataset such as WikiText-2) is joined into one text and cut into passages of about
``chunk_chars`` characters at whitespace, so the datapoints do not depend on the tokenizer and
stay aligned across models. A passage's score is ``exp(-mean token NLL)``, the inverse of its
perplexity (in (0, 1], higher is better), from ``tasks.perplexity.token_nlls`` (sliding window
when a passage is longer than the model's context). ``CorpusTask.perplexity`` gives the usual
corpus perplexity (every token of every passage weighted equally) for reports.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from sparse_merge.errors import check_positive
from sparse_merge.tasks.base import Example
from sparse_merge.tasks.data import DatasetBenchmark, Row
from sparse_merge.tasks.generation import context_length
from sparse_merge.tasks.perplexity import token_nlls


def chunk_text(text: str, chunk_chars: int) -> list[str]:
    """``text`` cut into passages of at most ``chunk_chars`` characters, each ending at
    whitespace when there is some; blank passages dropped."""
    out, start = [], 0
    while start < len(text):
        end = min(start + chunk_chars, len(text))
        if end < len(text):
            cut = max(text.rfind(" ", start, end), text.rfind("\n", start, end))
            end = cut + 1 if cut > start else end
        piece = text[start:end].strip()
        if piece:
            out.append(piece)
        start = end
    return out


class CorpusTask:
    """Passages scored by the inverse of their perplexity."""

    def __init__(self, name: str, texts: Sequence[str], window: int | None = None) -> None:
        self.name, self.texts, self.window = name, list(texts), window

    def __len__(self) -> int:
        return len(self.texts)

    def nlls(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[torch.Tensor]:
        """Per passage, the NLL of each of its tokens after the first."""
        window = self.window or min(context_length(model) or 1024, 1024)
        out = []
        for text in tqdm(self.texts, desc=self.name, leave=False):
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            out.append(token_nlls(model, ids, window=window, stride=max(1, window // 2)))
        return out

    def score(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
        """[N] ``exp(-mean NLL)`` per passage."""
        return torch.tensor(
            [
                math.exp(-n.double().mean().item()) if n.numel() else 0.0
                for n in self.nlls(model, tokenizer)
            ]
        )

    def perplexity(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> float:
        """Perplexity over every token of every passage."""
        all_nlls = torch.cat(self.nlls(model, tokenizer)).double()
        return math.exp(all_nlls.mean().item())


class Corpus(DatasetBenchmark):
    """A text corpus cut into passages: held-out, selection and training passages disjoint.
    Without ``data_files``, WikiText-2 (raw) from the hub: selection from ``validation``,
    held-out from ``test``, training passages from ``train``."""

    name = "corpus"
    hub_path = "Salesforce/wikitext"
    hub_name = "wikitext-2-raw-v1"

    def __init__(
        self,
        text_field: str = "text",
        chunk_chars: int = 2000,
        window: int | None = None,
        name: str = "corpus",
        **split_options: Any,
    ) -> None:
        check_positive("chunk_chars", chunk_chars)
        if window is not None:
            check_positive("window", window)
        super().__init__(
            **{"selection_split": "validation", "n_select": 64, "n_heldout": 128, **split_options}
        )
        self.name, self.text_field, self.chunk_chars, self.window = (
            name,
            text_field,
            chunk_chars,
            window,
        )
        self._passages: dict[str, list[Row]] = {}

    def rows(self, split: str) -> list[Row]:
        """The split's text, joined and cut into ``{"text": passage}`` rows."""
        if split not in self._passages:
            raw = super().rows(split)
            text = "\n".join(str(r[self.text_field]) for r in raw)
            self._passages[split] = [{"text": t} for t in chunk_text(text, self.chunk_chars)]
        return self._passages[split]

    def key(self, row: Row) -> str:
        """The passage itself."""
        return row["text"]

    def example(self, row: Row) -> Example:
        """The passage as an answer to an empty prompt (language-model training)."""
        return Example("", row["text"])

    def make_task(self, name: str, rows: list[Row]) -> CorpusTask:
        """A ``CorpusTask`` over the passages."""
        return CorpusTask(name, [r["text"] for r in rows], self.window)
