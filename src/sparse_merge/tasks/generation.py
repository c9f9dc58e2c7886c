"""Batched greedy generation and the tasks built on it (exact match, judged completions)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from sparse_merge.errors import check_choice
from sparse_merge.tasks.base import Example

CHAT_MODES = ("auto", "always", "never")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model was built for (``max_position_embeddings``), if known."""
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


class StopOnStrings(StoppingCriteria):
    """Marks a row finished once its generated text (after ``prompt_len``) contains a stop string."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str], prompt_len: int
    ) -> None:
        self.tokenizer, self.stop, self.prompt_len = tokenizer, tuple(stop), prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(
            input_ids[:, self.prompt_len :], skip_special_tokens=True
        )
        done = [any(s in t for s in self.stop) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # [B]


def eos_token_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int] | None:
    """The tokens that end a completion: the tokenizer's eos and every eos of the model's
    generation config (chat models end a turn with their own token, e.g. Gemma-2's
    ``<end_of_turn>``, Phi-3's ``<|end|>``, Llama-3-Instruct's ``<|eot_id|>``, which
    ``generate`` stops at by default); ``None`` when there is none."""
    config = getattr(model, "generation_config", None)
    ids: list[int] = []
    for value in (tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
        for i in value if isinstance(value, list | tuple) else [value]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids or None


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    for s in stop:
        text = text.split(s, 1)[0]
    return text


@torch.inference_mode()
def greedy_generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 64,
    stop: Sequence[str] = (),
    max_length: int | None = None,
    progress: bool = False,
) -> list[str]:
    """Greedy completions of ``prompts`` in their order, cut at eos or a stop string.

    Prompts are batched by length (less padding), left-padded, and decoded with the KV cache; a
    batch stops as soon as every row has produced eos (the tokenizer's or any of the model's
    generation config, ``eos_token_ids``) or a stop string. A prompt longer than
    ``max_length - max_new_tokens`` tokens (``max_length`` defaults to the model's context
    length) keeps its last tokens.
    """
    side, trunc = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    max_length = max_length or context_length(model)
    room = max_length - max_new_tokens if max_length and max_length > max_new_tokens else None
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    outputs: list[str] = [""] * len(prompts)
    try:
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc="generate", leave=False, disable=not progress):
            rows = order[start : start + batch_size]
            batch = tokenizer(
                [prompts[i] for i in rows],
                return_tensors="pt",
                padding=True,
                truncation=room is not None,
                max_length=room,
                add_special_tokens=False,
            ).to(_device(model))
            width = batch["input_ids"].shape[1]
            criteria = StoppingCriteriaList([StopOnStrings(tokenizer, stop, width)] if stop else [])
            generated = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                stopping_criteria=criteria,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos_token_ids(model, tokenizer),
            )  # [B, width + new]
            texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
            for i, text in zip(rows, texts):
                outputs[i] = cut_at_stop(text, stop)
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = side, trunc
    return outputs


def uses_chat_template(tokenizer: PreTrainedTokenizerBase, mode: str) -> bool:
    """Whether prompts go through the tokenizer's chat template: ``auto`` (when it has one),
    ``always`` (an error without one) or ``never``."""
    check_choice("chat_template", mode, CHAT_MODES)
    has = bool(getattr(tokenizer, "chat_template", None))
    if mode == "always" and not has:
        raise ValueError("chat_template='always' but the tokenizer has no chat template")
    return has and mode != "never"


def render_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], reply_prefix: str = ""
) -> str:
    """The prompt for the next assistant turn after ``messages``, through the chat template;
    with ``reply_prefix``, that turn already begins with it and the model continues it
    (``continue_final_message``, as lm-evaluation-harness renders a task's ``gen_prefix``)."""
    if not reply_prefix:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    turns = [*messages, {"role": "assistant", "content": reply_prefix}]
    return tokenizer.apply_chat_template(turns, tokenize=False, continue_final_message=True)


def exact_match(prediction: str, answer: str) -> bool:
    """Whitespace-insensitive exact match."""
    return prediction.strip() == answer.strip()


class GenerationTask:
    """Scores greedy completions: subclasses build the prompts (they may depend on the
    tokenizer, e.g. its chat template) and judge the completions, one score per datapoint."""

    name: str
    max_new_tokens: int
    batch_size: int
    stop: tuple[str, ...]

    def prompts(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        """One prompt per datapoint, in order."""
        raise NotImplementedError

    def judge(self, predictions: list[str]) -> list[float]:
        """One score in [0, 1] per completion."""
        raise NotImplementedError

    def predict(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        """The model's completions, in datapoint order."""
        return greedy_generate(
            model,
            tokenizer,
            self.prompts(tokenizer),
            self.max_new_tokens,
            self.batch_size,
            self.stop,
            progress=True,
        )

    def score(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
        """[N] scores, one per datapoint."""
        return torch.tensor(self.judge(self.predict(model, tokenizer)), dtype=torch.float32)


class FewShotTask(GenerationTask):
    """A generation task over dataset rows with few-shot exemplars (``shots``): with a chat
    template, each exemplar is a user turn (``question``) and an assistant turn (``answer``)
    before the row's own question; without one, ``plain_prompt`` formats the row."""

    datapoints: tuple[str, ...] = ("rows", "examples")  # indexed by datapoint

    rows: list[dict]
    shots: list[dict]
    chat_template: str

    def __len__(self) -> int:
        return len(self.rows)

    def question(self, row: dict) -> str:
        """The user turn of a row."""
        raise NotImplementedError

    def answer(self, row: dict) -> str:
        """The assistant turn of an exemplar."""
        raise NotImplementedError

    def plain_prompt(self, row: dict) -> str:
        """The prompt of a row, exemplars included, without a chat template."""
        raise NotImplementedError

    def reply_prefix(self, row: dict) -> str:
        """What the assistant turn of a row starts with, through a chat template (none here)."""
        return ""

    def prompt(self, tokenizer: PreTrainedTokenizerBase, row: dict) -> str:
        """The few-shot prompt of one row."""
        if not uses_chat_template(tokenizer, self.chat_template):
            return self.plain_prompt(row)
        messages = []
        for shot in self.shots:
            messages.append({"role": "user", "content": self.question(shot)})
            messages.append({"role": "assistant", "content": self.answer(shot)})
        messages.append({"role": "user", "content": self.question(row)})
        return render_chat(tokenizer, messages, self.reply_prefix(row))

    def prompts(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        """One prompt per row."""
        return [self.prompt(tokenizer, row) for row in self.rows]


class ExactMatchTask(GenerationTask):
    """Scores 1 when the greedy completion of a prompt equals its answer, else 0."""

    datapoints: tuple[str, ...] = ("examples",)  # indexed by datapoint (``distributed``)

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

    def prompts(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        """The examples' prompts."""
        return [e.prompt for e in self.examples]

    def judge(self, predictions: list[str]) -> list[float]:
        """1.0 where the completion matches the answer."""
        return [float(self.match(p, e.answer)) for p, e in zip(predictions, self.examples)]

    def score(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
        """[N] bool: exact match per datapoint."""
        return super().score(model, tokenizer).bool()
