"""Masked LoRA versus dense PEFT LoRA: training step time and peak step memory, as ratios.

Same model, same batch, same rank and targets; one step is forward + backward + AdamW. Rows:

- ``dense``: PEFT LoRA (the reference, ratio 1).
- ``sparse_to_dense``: PEFT's forward; the mask only costs a bool buffer until the merge.
- ``sparse_to_sparse``: the fused layer (one matmul through ``(W + s*B@A) * M``, the
  effective weight recomputed in backward).
- ``s2s_two_matmuls`` and ``s2s_autograd``: the plain-autograd forms the fused layer replaces,
  ``base(x) + s * x @ ((B@A) * M)^T`` and ``x @ ((W + s*B@A) * M)^T``, kept for comparison.

Step time is the best of interleaved rounds (one thread; other processes on a shared machine
only ever add time, so the minimum is the most repeatable statistic), the median is listed too. Peak memory is the highest total of live tensor bytes during one step minus
the total at its start (the PyTorch profiler's memory timeline, CPU or CUDA), so it counts
activations, gradients and transients, not the weights, masks or optimiser state that exist
before the step; ``stored_masks_mb`` is the mask memory held for the whole run (zero when every
mask is the zero pattern of its pruned weight, see ``finetune/lora.py``).
"""

from __future__ import annotations

import copy
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from sparse_merge.finetune.lora import LoraAdapter, MaskedLoraLinear
from sparse_merge.models.tokenizer import char_tokenizer
from sparse_merge.models.toy import toy_llama
from sparse_merge.pruning.magnitude import MagnitudePruner

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ARCH = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=128,
)
BATCH, SEQ, RANK, ROUNDS = 16, 64, 8, 9


class _TwoMatmuls(MaskedLoraLinear):
    """Reference: base output plus a second matmul through the dense masked update."""

    def forward(self, x, *args, **kwargs):
        a, b = self.lora_A["default"].weight, self.lora_B["default"].weight
        delta = (b @ a) * self.scaling["default"] * self.keep()  # [out, in], kept by autograd
        return self.base_layer(x) + F.linear(x, delta)


class _Autograd(MaskedLoraLinear):
    """Reference: one matmul through the masked effective weight, plain autograd (which keeps
    that [out, in] weight alive until the backward pass)."""

    def forward(self, x, *args, **kwargs):
        a, b = self.lora_A["default"].weight, self.lora_B["default"].weight
        w = (self.base_layer.weight + (b @ a) * self.scaling["default"]) * self.keep()
        return F.linear(x, w)


def _build(mode: str, base: torch.nn.Module, masks) -> torch.nn.Module:
    adapter_mode = "sparse_to_sparse" if mode.startswith("s2s_") else mode
    model = LoraAdapter(mode=adapter_mode, r=RANK, target_modules=TARGETS).wrap(
        copy.deepcopy(base), masks
    )
    swap = {"s2s_two_matmuls": _TwoMatmuls, "s2s_autograd": _Autograd}.get(mode)
    if swap is not None:
        for m in model.modules():
            if isinstance(m, MaskedLoraLinear):
                m.__class__ = swap
    with torch.no_grad():  # B = 0 at init would make every update path trivially cheap to get right
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    return model.train()


def _step(model, opt, batch) -> None:
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _peak_step_bytes(model, opt, batch, device: torch.device) -> int:
    """Peak of live tensor bytes during one step, above the level at its start (the
    profiler's memory timeline, all categories summed)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(
        activities=activities, profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        _step(model, opt, batch)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the timeline export is deprecated
        path = Path(tmp) / "timeline.json"
        prof.export_memory_timeline(str(path), device=str(device))
        _, sizes = json.loads(path.read_text())  # [T][categories] bytes
    totals = [sum(s) for s in sizes]
    return max(totals) - totals[0]


def measure_steps(
    models: dict[str, torch.nn.Module], batch: torch.Tensor, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Step times (``ROUNDS`` per model, interleaved) and peak step bytes of each model, each
    with its own AdamW over its trainable parameters."""
    opts = {
        m: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for m, model in models.items()
    }
    for m in models:  # warm-up: optimiser state exists before anything is measured
        for _ in range(2):
            _step(models[m], opts[m], batch)
    times: dict[str, list[float]] = {m: [] for m in models}
    for _ in range(ROUNDS):  # interleaved, so load changes hit every model alike
        for m in models:
            start = time.perf_counter()
            _step(models[m], opts[m], batch)
            times[m].append(time.perf_counter() - start)
    memory = {m: _peak_step_bytes(models[m], opts[m], batch, device) for m in models}
    return times, memory


def run() -> list[dict]:
    """One row per mode: step time and peak step memory, absolute and relative to dense LoRA."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        device = torch.device("cpu")
        tokenizer = char_tokenizer()
        base = toy_llama(tokenizer, seed=0, **ARCH).to(device)
        masks = MagnitudePruner().prune(base, None, 0.5)
        gen = torch.Generator().manual_seed(0)
        batch = torch.randint(4, len(tokenizer), (BATCH, SEQ), generator=gen).to(device)
        modes = ["dense", "sparse_to_dense", "sparse_to_sparse", "s2s_two_matmuls", "s2s_autograd"]
        models = {m: _build(m, base, masks) for m in modes}
        times, memory = measure_steps(models, batch, device)
    finally:
        torch.set_num_threads(threads)
    ref_t, ref_m = min(times["dense"]), memory["dense"]
    return [
        {
            "mode": m,
            "step_ms": 1000 * min(times[m]),
            "time_ratio": min(times[m]) / ref_t,
            "median_ratio": statistics.median(times[m]) / statistics.median(times["dense"]),
            "peak_step_mb": memory[m] / 2**20,
            "memory_ratio": memory[m] / ref_m,
            "stored_masks_mb": sum(
                b.numel() * b.element_size()
                for n, b in models[m].named_buffers()
                if "keep_mask" in n
            )
            / 2**20,
            "batch": f"{BATCH}x{SEQ}",
            "model": f"llama d={ARCH['hidden_size']} L={ARCH['num_hidden_layers']} r={RANK}",
        }
        for m in modes
    ]


if __name__ == "__main__":
    from sparse_merge.tracking.report import format_table

    print(format_table(run()))
