"""Batched greedy generation: order, stop strings, max new tokens, truncation."""

from __future__ import annotations

import torch

from sparse_merge.tasks.generation import StopOnStrings, cut_at_stop, greedy_generate

PROMPTS = ["1+2=", "rev:abcdef=", "33+44=", "a", "rev:ab="]


def test_batches_sorted_by_length_keep_prompt_order(tiny_llama, tokenizer):
    batched = greedy_generate(tiny_llama, tokenizer, PROMPTS, max_new_tokens=6, batch_size=2)
    single = [greedy_generate(tiny_llama, tokenizer, [p], 6, 1)[0] for p in PROMPTS]
    assert batched == single
    assert all(len(tokenizer(o, add_special_tokens=False)["input_ids"]) <= 6 for o in batched)


def test_stop_strings_cut_the_completion(tiny_llama, tokenizer):
    free = greedy_generate(tiny_llama, tokenizer, PROMPTS, max_new_tokens=12, batch_size=8)
    stop = next(ch for ch in free[0][2:] if ch.strip())  # a character the first completion has
    cut = greedy_generate(tiny_llama, tokenizer, PROMPTS, 12, batch_size=8, stop=[stop])
    assert cut == [cut_at_stop(f, [stop]) for f in free]
    assert cut[0] == free[0].split(stop, 1)[0]


def test_stop_criterion_marks_rows_done(tokenizer):
    ids = tokenizer(["xx12", "xx3\n"], return_tensors="pt", add_special_tokens=False)["input_ids"]
    done = StopOnStrings(tokenizer, ["\n", "9"], prompt_len=2)(ids, None)
    assert done.tolist() == [False, True]
    assert StopOnStrings(tokenizer, ["x"], prompt_len=2)(ids, None).tolist() == [False, False]


def test_long_prompts_keep_their_last_tokens(tiny_llama, tokenizer):
    long = "12+34=46\n" * 20  # 180 tokens, the model holds 64
    out = greedy_generate(tiny_llama, tokenizer, [long, "1+1="], max_new_tokens=4)
    tail = long[-60:]  # 64 - 4 new tokens
    assert out[0] == greedy_generate(tiny_llama, tokenizer, [tail], max_new_tokens=4)[0]


def test_generation_leaves_the_tokenizer_as_it_was(tiny_llama, tokenizer):
    tokenizer.padding_side = "right"
    try:
        greedy_generate(tiny_llama, tokenizer, PROMPTS[:2], 2)
        assert tokenizer.padding_side == "right"
    finally:
        tokenizer.padding_side = "left"
    assert torch.is_grad_enabled()


def test_generation_stops_as_soon_as_every_row_hit_a_stop(tiny_llama, tokenizer):
    free = greedy_generate(tiny_llama, tokenizer, ["rev:abc="], max_new_tokens=12)[0]
    assert len(free) == 12
    stop = free[3:5]
    calls = []
    handle = tiny_llama.register_forward_hook(lambda *a: calls.append(1))
    try:
        greedy_generate(tiny_llama, tokenizer, ["rev:abc="], max_new_tokens=12, stop=[stop])
    finally:
        handle.remove()
    assert len(calls) == free.index(stop) + 2 < 12  # one forward per generated token


def test_generation_stops_at_every_eos_of_the_generation_config(tiny_llama, tokenizer):
    # chat models list their end-of-turn token there (Gemma-2, Phi-3, Llama-3-Instruct)
    free = greedy_generate(tiny_llama, tokenizer, ["rev:abc="], max_new_tokens=12)[0]
    end = next(ch for ch in free[2:] if ch.strip())  # a token the completion produces
    tiny_llama.generation_config.eos_token_id = [
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids(end),
    ]
    out = greedy_generate(tiny_llama, tokenizer, ["rev:abc="], max_new_tokens=12)[0]
    assert out == free[: free.index(end) + 1]
