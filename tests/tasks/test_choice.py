"""Multiple choice by log-likelihood (BoolQ, HellaSwag) with stubs of known preferences."""

from __future__ import annotations

import math

import pytest
import torch

from sparse_merge.errors import ConfigError
from sparse_merge.tasks.boolq import BoolQ
from sparse_merge.tasks.choice import Choice, MultipleChoiceTask, option_logprobs
from sparse_merge.tasks.hellaswag import HellaSwag, clean

from .conftest import FIXTURES, favouring

BOOLQ = {
    "train": str(FIXTURES / "boolq_train.parquet"),
    "validation": str(FIXTURES / "boolq_validation.parquet"),
}


def test_log_likelihood_is_exact(tokenizer):
    model = favouring(tokenizer, {"a": 2.5, "b": 3.0})
    v = len(tokenizer)
    log_z = math.log(v - 2 + math.exp(2.5) + math.exp(3.0))
    (a, na), (bb, nbb) = option_logprobs(model, tokenizer, [("x=", "a"), ("x=", "bb")])
    assert (na, nbb) == (1, 2)
    assert a == pytest.approx(2.5 - log_z) and bb == pytest.approx(2 * (3.0 - log_z))


def test_length_normalisation_changes_the_choice(tokenizer):
    model = favouring(tokenizer, {"a": 2.5, "b": 3.0})
    item = [Choice("x=", ("a", "bb"), 1)]
    assert MultipleChoiceTask("t", item, "none").predict(model, tokenizer) == [0]
    assert MultipleChoiceTask("t", item, "token").predict(model, tokenizer) == [1]
    assert MultipleChoiceTask("t", item, "char").predict(model, tokenizer) == [1]
    with pytest.raises(ConfigError, match="length_norm"):
        MultipleChoiceTask("t", item, "bytes")


def test_char_normalisation_counts_the_choice_not_its_delimiter(tiny_llama, tokenizer):
    """lm-eval's acc_norm divides by the characters of the choice; the space before it is its
    target delimiter, not counted (dividing by it too could flip a close choice)."""
    item = [Choice("x=", (" a", " bb"), 1)]
    raw = option_logprobs(tiny_llama, tokenizer, [("x=", " a"), ("x=", " bb")])
    got = MultipleChoiceTask("t", item, "char").option_scores(tiny_llama, tokenizer)
    assert got == [[pytest.approx(raw[0][0] / 1), pytest.approx(raw[1][0] / 2)]]


def test_batches_and_padding_do_not_change_scores(tiny_llama, tokenizer):
    pairs = [("12+3=", "15"), ("rev:abc=", "cba"), ("1=", "1234567"), ("a b ", "c")]
    one = option_logprobs(tiny_llama, tokenizer, pairs, batch_size=1)
    many = option_logprobs(tiny_llama, tokenizer, pairs, batch_size=4)
    assert [n for _, n in one] == [2, 3, 7, 2]  # the context's trailing space moves to the option
    assert torch.allclose(
        torch.tensor([s for s, _ in one]), torch.tensor([s for s, _ in many]), atol=1e-4
    )


def test_boolq_yes_model_scores_the_share_of_yes(tokenizer):
    bench = BoolQ(data_files=BOOLQ, n_select=2, n_heldout=4)
    task = bench.heldout
    labels = [it.label for it in task.items]
    assert labels == [0, 1, 1, 1] and task.items[0].options == (" no", " yes")
    yes = favouring(tokenizer, {"y": 5.0, "e": 5.0, "s": 5.0})
    no = favouring(tokenizer, {"n": 5.0, "o": 5.0})
    assert task.score(yes, tokenizer).tolist() == [False, True, True, True]
    assert task.score(no, tokenizer).tolist() == [True, False, False, False]
    assert task.items[0].context.endswith("?\nAnswer:")
    assert {e.answer for e in bench.train_examples(8, 0)} <= {" no", " yes"}


def test_hellaswag_preprocessing_and_scoring(tokenizer):
    bench = HellaSwag(data_files=str(FIXTURES / "hellaswag.jsonl"), n_select=3, n_heldout=3)
    items = bench.selection.items + bench.heldout.items
    assert len({it.context for it in items}) == 6 and all(len(it.options) == 4 for it in items)
    assert (
        clean("Hair: [header] How to grow [title] Eat protein.")
        == "Hair: How to grow. Eat protein."
    )
    task = bench.heldout
    oracle_scores = []
    for it in task.items:  # a stub that favours the letters of the right ending only
        wrong = set("".join(o for i, o in enumerate(it.options) if i != it.label))
        boosts = {c: 4.0 for c in set(it.options[it.label]) - wrong if c in tokenizer.get_vocab()}
        assert boosts  # the right ending has a letter no wrong ending has
        sub = MultipleChoiceTask("one", [it], "char")
        oracle_scores.append(sub.score(favouring(tokenizer, boosts), tokenizer).item())
    assert all(oracle_scores)


def test_runs_on_the_toy_model(tiny_llama, tokenizer):
    for bench in (
        BoolQ(data_files=BOOLQ, n_select=2, n_heldout=2),
        HellaSwag(data_files=str(FIXTURES / "hellaswag.jsonl"), n_select=2, n_heldout=2),
    ):
        scores = bench.selection.score(tiny_llama, tokenizer)
        assert scores.shape == (2,) and scores.dtype == torch.bool
