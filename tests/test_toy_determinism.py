"""The toy zoo trains the same models, bit for bit, whatever thread count the caller set.

Unpinned, CPU kernels sum in a thread-dependent order: on an AVX-512 machine 1 and 2 threads
happened to agree on the real toy's sizes, 8 threads did not (MKL splits the 56-token
vocabulary of the LM head across threads), so the zoo's models depended on the machine's core
count. Sizes here are the real toy's widths (hidden 128, 56-token vocabulary, 64 examples a
batch) with one layer and a few steps.
"""

import json

import torch
from safetensors.torch import load_file

from .conftest import small_zoo

THREADS = (1, 2, 8)  # 8: more than most test machines have, which only makes it slower
MEMBERS = ("base", "math", "code")


def _zoo(cache):
    return small_zoo(
        cache,
        "det",
        base_addition=(1, 2),
        arch={
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        base_steps=4,
        child_steps=3,
        batch_size=64,
        child_replay=0.5,
    )


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)  # -0.0 vs 0.0 and NaN payloads count as different


def test_trained_weights_do_not_depend_on_the_callers_thread_count(tmp_path):
    caller = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    weights = {}
    try:
        for n in THREADS:
            torch.set_num_threads(n)
            zoo = _zoo(tmp_path / f"threads{n}")
            zoo.ensure()
            # the zoo pins its own settings while training and gives the caller's back
            assert torch.get_num_threads() == n
            assert torch.are_deterministic_algorithms_enabled() == deterministic
            assert json.loads((zoo.root / "spec.json").read_text())["pinned"]["num_threads"] == 1
            weights[n] = {m: load_file(zoo.root / m / "model.safetensors") for m in MEMBERS}
    finally:
        torch.set_num_threads(caller)
    ref = weights[THREADS[0]]
    for n in THREADS[1:]:
        for m in MEMBERS:
            differ = [
                k for k, t in weights[n][m].items() if not torch.equal(_bits(t), _bits(ref[m][k]))
            ]
            assert not differ, f"{m} trained on {n} threads differs from 1 thread in {differ}"


def test_pinning_is_recorded_and_keyed_when_it_changes(tmp_path, monkeypatch):
    from sparse_merge.models import toy

    zoo = _zoo(tmp_path)
    # the pinning that reproduces the caches made before it stays out of the key (they stay
    # valid) but is written to spec.json; another pinning trains under a key of its own
    assert zoo._spec["pinned"] == toy.DETERMINISM == toy.UNPINNED_EQUIVALENT
    monkeypatch.setattr(toy, "DETERMINISM", {**toy.DETERMINISM, "num_threads": 2})
    assert _zoo(tmp_path).root != zoo.root
