"""Row-sparse fine-tuning versus dense PEFT LoRA at equal trainable parameters: step time, peak
step memory and the bytes the frozen base weights take.

Same model, batch and targets; LoRA has rank ``RANK`` and the row-sparse update the same
parameter budget (``lora_rank=RANK``: per layer the most rows with ``k * in <= r * (in + out)``).
One step is forward + backward + AdamW. Rows:

- ``lora``: PEFT LoRA (the reference, ratio 1).
- ``row_sparse``: ``RowSparseLinear`` on the full-precision base.
- ``row_sparse_masked``: the same on a base pruned to 50 % (the update multiplied by the
  keep-mask of its rows).
- ``row_sparse_nf4``: the base in pure-torch NF4 (dequantised each forward), update from the
  quantisation residual.

Step time is the median over interleaved rounds on one thread; peak step memory uses the
profiler's memory timeline as in ``bench_lora`` (live tensor bytes above the level at the start
of the step). ``base_mb`` is the storage of the targeted layers' frozen weights.
"""

from __future__ import annotations

import copy
import importlib.util
import statistics
from pathlib import Path

import torch

from sparse_merge.finetune.adapter import count_parameters
from sparse_merge.finetune.lora import LoraAdapter
from sparse_merge.finetune.nf4 import NF4Linear
from sparse_merge.finetune.row_sparse import row_sparse_modules
from sparse_merge.finetune.row_sparse_adapter import RowSparseAdapter
from sparse_merge.models.tokenizer import char_tokenizer
from sparse_merge.models.toy import toy_llama
from sparse_merge.pruning.magnitude import MagnitudePruner

_spec = importlib.util.spec_from_file_location(
    "bench_lora", Path(__file__).resolve().parent / "bench_lora.py"
)
bench_lora = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_lora)

TARGETS, ARCH, RANK = bench_lora.TARGETS, bench_lora.ARCH, bench_lora.RANK
BATCH, SEQ, ROUNDS = bench_lora.BATCH, bench_lora.SEQ, bench_lora.ROUNDS


def _base_bytes(model: torch.nn.Module) -> int:
    """Bytes of the frozen weights of the targeted layers (NF4 codes + scales where quantised)."""
    total = 0
    for name, m in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if isinstance(m, NF4Linear):
            total += m.q.nbytes()
        elif isinstance(m, torch.nn.Linear) and last in (*TARGETS, "base", "base_layer"):
            total += m.weight.numel() * m.weight.element_size()
    return total


def _build(mode: str, base: torch.nn.Module, masks) -> torch.nn.Module:
    model = copy.deepcopy(base)
    if mode == "lora":
        model = LoraAdapter(mode="dense", r=RANK, target_modules=TARGETS).wrap(model, None)
        with torch.no_grad():  # B = 0 at init would make the update path trivially cheap
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.01)
        return model.train()
    kwargs = {"quantize": "nf4", "init": "residual"} if mode == "row_sparse_nf4" else {}
    adapter = RowSparseAdapter(
        importance="magnitude", lora_rank=RANK, target_modules=TARGETS, **kwargs
    )
    model = adapter.wrap(model, masks if mode == "row_sparse_masked" else None)
    with torch.no_grad():
        for m in row_sparse_modules(model).values():
            m.delta.normal_(0, 0.01)
    return model.train()


def run() -> list[dict]:
    """One row per method: trainable parameters, step time, peak step memory, base bytes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        device = torch.device("cpu")
        tokenizer = char_tokenizer()
        base = toy_llama(tokenizer, seed=0, **ARCH).to(device)
        pruned = copy.deepcopy(base)
        masks = MagnitudePruner().prune(pruned, None, 0.5)
        gen = torch.Generator().manual_seed(0)
        batch = torch.randint(4, len(tokenizer), (BATCH, SEQ), generator=gen).to(device)
        modes = ["lora", "row_sparse", "row_sparse_masked", "row_sparse_nf4"]
        models = {m: _build(m, pruned if m == "row_sparse_masked" else base, masks) for m in modes}
        times, memory = bench_lora.measure_steps(models, batch, device)
    finally:
        torch.set_num_threads(threads)
    ref_t, ref_m = statistics.median(times["lora"]), memory["lora"]
    return [
        {
            "method": m,
            "trainable": count_parameters(models[m]),
            "step_ms": 1000 * statistics.median(times[m]),
            "time_ratio": statistics.median(times[m]) / ref_t,
            "peak_step_mb": memory[m] / 2**20,
            "memory_ratio": memory[m] / ref_m,
            "base_mb": _base_bytes(models[m]) / 2**20,
            "batch": f"{BATCH}x{SEQ}",
            "model": f"llama d={ARCH['hidden_size']} L={ARCH['num_hidden_layers']} r={RANK}",
        }
        for m in modes
    ]


if __name__ == "__main__":
    from sparse_merge.tracking.report import format_table

    print(format_table(run()))
