"""Training examples: loss on answers only, and truncation that keeps the answer."""

from sparse_merge.finetune.data import IGNORE_INDEX, encode_examples
from sparse_merge.models.tokenizer import char_tokenizer
from sparse_merge.tasks.base import Example


def _decode(tok, ids):
    return tok.decode([i for i in ids if i != IGNORE_INDEX and i != tok.pad_token_id])


def test_labels_cover_the_answer_and_eos_only():
    tok = char_tokenizer()
    batch = encode_examples(tok, [Example("12+3=", "15"), Example("ab>", "ba")])
    labels = batch["labels"]
    assert _decode(tok, labels[0].tolist()[:-1]) == "15"
    assert labels[0, 5:8].tolist() == [
        *tok("15", add_special_tokens=False)["input_ids"],
        tok.eos_token_id,
    ]
    assert (labels[1, :3] == IGNORE_INDEX).all() and batch["attention_mask"][1].sum() == 6


def test_a_long_prompt_loses_its_start_not_its_answer():
    tok = char_tokenizer()
    batch = encode_examples(tok, [Example("x" * 50 + "q:", "yes")], max_length=10)
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert len(ids) == 10
    assert tok.decode(ids[:6]) == "xxxxq:"  # the prompt's end survives
    answer = [t for t in labels if t != IGNORE_INDEX]
    assert answer == [*tok("yes", add_special_tokens=False)["input_ids"], tok.eos_token_id]
