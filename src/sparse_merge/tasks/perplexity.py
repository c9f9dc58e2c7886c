"""Perplexity: the one place where token negative log-likelihoods are computed and pooled.

Two kinds of text are scored:

* a **passage** of a text corpus: every token after the first, with a sliding window when the
  passage is longer than the window (as in the Hugging Face perplexity guide, each token scored
  exactly once, with ``window - stride`` tokens of context carried over);
* a **prompt/answer example** (the toy and benchmark tasks): the ``answer + eos`` tokens given
  the prompt, the tokens a fine-tuned model learns (prompts are never trained on).

``perplexity(nlls)`` pools them the usual way: ``exp`` of the mean NLL over every scored token
(every token weighs the same, not every passage). ``task_nlls`` gives the held-out NLLs of any
task: a corpus task's passages, else its examples' answers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from sparse_merge.errors import ConfigError
from sparse_merge.finetune.data import IGNORE_INDEX, encode_examples
from sparse_merge.tasks.base import Example


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


def passage_nlls(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    window: int,
    stride: int,
    desc: str = "perplexity",
) -> list[torch.Tensor]:
    """Per passage, the NLL of each of its tokens after the first (sliding window)."""
    out = []
    for text in tqdm(texts, desc=desc, leave=False):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        out.append(token_nlls(model, ids, window, stride))
    return out


@torch.inference_mode()
def answer_nlls(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    batch_size: int = 64,
    desc: str = "perplexity",
) -> list[torch.Tensor]:
    """Per example, the NLL of each ``answer + eos`` token given its prompt, in padded batches."""
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    starts = range(0, len(examples), batch_size)
    for i in tqdm(starts, desc=desc, leave=False, disable=len(starts) < 2):
        batch = encode_examples(tokenizer, examples[i : i + batch_size])
        ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        labels = batch["labels"][:, 1:].to(device)  # [b, T-1]: token t+1 predicted at t
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()  # [b, T-1, V]
        nll = nn.functional.cross_entropy(
            logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
        )  # [b, T-1], 0 where ignored
        keep = labels != IGNORE_INDEX
        out.extend(nll[r][keep[r]].cpu() for r in range(nll.shape[0]))
    return out


def perplexity(nlls: Sequence[torch.Tensor]) -> float:
    """``exp`` of the mean NLL over every token of every sequence."""
    flat = torch.cat([n.reshape(-1) for n in nlls]).double() if nlls else torch.zeros(0)
    if flat.numel() == 0:
        raise ValueError("perplexity of no tokens")
    return math.exp(flat.mean().item())


def task_nlls(task, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[torch.Tensor]:
    """The NLLs of a task's datapoints: a corpus task's own (``nlls``), else the answers of its
    prompt/answer ``examples``."""
    if hasattr(task, "nlls"):
        return task.nlls(model, tokenizer)
    examples = getattr(task, "examples", None)
    if examples is None:
        raise ConfigError("task", task.name, "a text corpus or a task with prompt/answer examples")
    return answer_nlls(model, tokenizer, list(examples), desc=task.name)
