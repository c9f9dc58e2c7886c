import math

import torch

from sparse_merge.tasks.perplexity import perplexity, token_nlls


def test_every_token_scored_once_whatever_the_stride(tiny_llama, tokenizer):
    ids = tokenizer("12+34=46\nrev:abc=cba\n" * 4, return_tensors="pt", add_special_tokens=False)[
        "input_ids"
    ]
    full = token_nlls(tiny_llama, ids, window=ids.numel() + 1, stride=ids.numel())
    assert full.numel() == ids.numel() - 1
    for stride in (1, 7, 31):
        strided = token_nlls(tiny_llama, ids, window=32, stride=stride)
        assert strided.numel() == ids.numel() - 1
        assert torch.allclose(strided[:31], full[:31], atol=1e-5)  # first window: same context


def test_uniform_model_has_vocab_perplexity(tokenizer):
    class Uniform(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids):
            return type("O", (), {"logits": torch.zeros(*ids.shape, 50)})()

    ids = tokenizer("abcdefgh", return_tensors="pt")["input_ids"]
    assert math.isclose(perplexity([token_nlls(Uniform(), ids, 4, 2)]), 50.0, rel_tol=1e-6)
