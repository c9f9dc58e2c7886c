"""Fixtures for task tests: fixture files and language-model stubs with known preferences."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sparse_merge.models.tokenizer import char_tokenizer

FIXTURES = Path(__file__).parents[1] / "fixtures" / "tasks"
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


class FavourLM(nn.Module):
    """Ignores its input: every position's next-token logits are ``bias`` [V]."""

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias.float())

    def forward(self, input_ids: torch.Tensor, attention_mask=None, **kwargs) -> SimpleNamespace:
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))


def favouring(tokenizer, boosts: dict[str, float]) -> FavourLM:
    """A stub whose logits are 0 except ``boosts[c]`` for the token of each character ``c``."""
    bias = torch.zeros(len(tokenizer))
    for ch, value in boosts.items():
        bias[tokenizer.convert_tokens_to_ids(ch)] = value
    return FavourLM(bias)


@pytest.fixture
def chat_tokenizer():
    """The character tokenizer with a small chat template."""
    tok = char_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok
