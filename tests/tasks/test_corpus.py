"""Perplexity on a text corpus: passages, per-passage scores and the corpus perplexity."""

from __future__ import annotations

import math

import pytest
import torch

from sparse_merge.tasks.corpus import Corpus, chunk_text
from sparse_merge.tasks.perplexity import perplexity, token_nlls

from .conftest import FIXTURES, favouring

TEXT = FIXTURES / "corpus.txt"


def test_chunks_are_bounded_and_cover_the_text():
    text = TEXT.read_text()
    chunks = chunk_text(text, 120)
    assert all(len(c) <= 120 for c in chunks) and len(chunks) >= 7
    assert " ".join(chunks).split() == text.split()


def test_subsets_are_disjoint_passages():
    bench = Corpus(data_files=str(TEXT), chunk_chars=120, n_select=3, n_heldout=4)
    sel, held = bench.selection.texts, bench.heldout.texts
    train = {e.answer for e in bench.train_examples(50, 0)}
    assert len(sel) == 3 and len(held) == 4 and not set(sel) & set(held)
    assert train and not train & (set(sel) | set(held))


def test_uniform_model_scores_one_over_the_vocabulary(tokenizer):
    task = Corpus(data_files=str(TEXT), chunk_chars=120, n_select=2, n_heldout=2).heldout
    uniform = favouring(tokenizer, {})
    v = len(tokenizer)
    assert torch.allclose(task.score(uniform, tokenizer), torch.full((2,), 1 / v).double().float())
    assert task.perplexity(uniform, tokenizer) == pytest.approx(v)


def test_scores_are_inverse_perplexities(tiny_llama, tokenizer):
    task = Corpus(data_files=str(TEXT), chunk_chars=60, n_select=2, n_heldout=2, window=32).heldout
    scores = task.score(tiny_llama, tokenizer)
    expected = [
        1
        / perplexity(
            [token_nlls(tiny_llama, tokenizer(t, return_tensors="pt")["input_ids"], 32, 16)]
        )
        for t in task.texts
    ]
    assert scores.tolist() == pytest.approx(expected, rel=1e-5)
    assert all(0 < s < 1 for s in scores.tolist()) and math.isfinite(
        task.perplexity(tiny_llama, tokenizer)
    )
