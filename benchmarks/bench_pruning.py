"""Pruning time per prunable layer for every pruner, on a random Llama built from a config.

Each pruner prunes a fresh copy of the same model to 50 % (2:4 for the N:M rows) with the same
calibration batch; the time covers everything the pruner does (calibration forward passes,
statistics, scores, masks, weight updates). On CUDA the model is larger and timings are
synchronised.

Then magnitude pruning (per layer, the default, and per row, returning the masks; per row in
place, keeping none, as a search prunes) at the smallest size users merge:
a Qwen2-1.5B config with random bfloat16 weights on the CPU, pruned to 50 %, then the pruned
model to 40 % (a sparse genome pruned again: its zeros straddle the cut), each on the same
weights; and the mask cache's work on the pruned model (pack its mask, apply a packed one).
"""

from __future__ import annotations

import copy
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sparse_merge.models.blocks import prunable_layers
from sparse_merge.pruning.base import Calibration
from sparse_merge.pruning.importance import RandomImportance, TaylorImportance
from sparse_merge.pruning.magnitude import MagnitudePruner
from sparse_merge.pruning.scored import ScorePruner
from sparse_merge.pruning.sparsegpt import SparseGPTPruner
from sparse_merge.pruning.sparsity import measure_sparsity
from sparse_merge.pruning.wanda import WandaPruner


def _setting() -> tuple[torch.device, dict, int, int]:
    if torch.cuda.is_available():
        arch = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4)
        return torch.device("cuda"), arch, 64, 512
    arch = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2)
    return torch.device("cpu"), arch, 16, 128


def _pruners() -> dict[str, tuple[object, float]]:
    return {
        "magnitude": (MagnitudePruner(), 0.5),
        "random": (ScorePruner(RandomImportance(seed=0), "layer"), 0.5),
        "wanda": (WandaPruner(n_calibration=1024), 0.5),
        "wanda 2:4": (WandaPruner(n_calibration=1024, nm="2:4"), 0.5),
        "taylor": (ScorePruner(TaylorImportance(n_batches=1024, batch_size=8), "row"), 0.5),
        "structured (heads)": (
            ScorePruner(TaylorImportance(n_batches=1024, batch_size=8), "head"),
            0.5,
        ),
        "sparsegpt": (SparseGPTPruner(n_calibration=1024), 0.5),
        "sparsegpt 2:4": (SparseGPTPruner(n_calibration=1024, nm="2:4"), 0.5),
    }


def run() -> list[dict]:
    """One row per pruner: total seconds, milliseconds per prunable layer, achieved sparsity."""
    device, arch, n_seq, seq_len = _setting()
    config = LlamaConfig(
        vocab_size=1024,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=seq_len,
        **arch,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(device).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (n_seq, seq_len), generator=g)
    calib = Calibration(ids, torch.ones_like(ids))
    n_layers = len(prunable_layers(base))
    rows = []
    for name, (pruner, sparsity) in _pruners().items():
        model = copy.deepcopy(base)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        pruner.prune(model, calib, sparsity)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        rows.append(
            {
                "pruner": name,
                "device": device.type,
                "hidden": arch["hidden_size"],
                "layers": n_layers,
                "calib_tokens": n_seq * seq_len,
                "total_s": round(seconds, 3),
                "ms_per_layer": round(1000 * seconds / n_layers, 2),
                "sparsity": round(measure_sparsity(model).overall, 4),
            }
        )
        del model
    return rows + at_scale()


def at_scale(name: str = "qwen2-1.5b") -> list[dict]:
    """Magnitude pruning of a model built from ``name``'s config (random bfloat16 weights, on
    the CPU), per layer and per row (and per row in place, as a search prunes): to 50 % from
    dense, then to 40 % from there."""
    from transformers import AutoModelForCausalLM

    from sparse_merge.evolution.prune_cache import apply_packed_, pack_nonzero
    from sparse_merge.models.configs import load_config
    from sparse_merge.models.paramspace import ParamSpace

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(load_config(name), dtype=torch.bfloat16).eval()
    space = ParamSpace(model)
    dense = space.flat.clone()
    n_layers = len(prunable_layers(model))
    rows = []
    # ``prune`` returns every layer's keep-mask (1 B per weight); a search prunes in place,
    # keeping none (``prune_``)
    for granularity, how in (("layer", "prune"), ("row", "prune"), ("row", "prune_")):
        space.flat.copy_(dense)
        for sparsity, what in ((0.5, "dense to 50 %"), (0.4, "then to 40 % (zeros straddle)")):
            t = time.perf_counter()
            getattr(MagnitudePruner(granularity), how)(model, None, sparsity)
            seconds = time.perf_counter() - t
            rows.append(
                {
                    "pruner": f"magnitude per {granularity} ({how}), {name} bf16, {what}",
                    "device": "cpu",
                    "hidden": model.config.hidden_size,
                    "layers": n_layers,
                    "total_s": round(seconds, 3),
                    "ms_per_layer": round(1000 * seconds / n_layers, 2),
                    "sparsity": round(measure_sparsity(model).overall, 4),
                }
            )
    # the mask cache (``prune_cache``) packs a pruned parent's mask the first time and applies
    # it after that
    t = time.perf_counter()
    packed = pack_nonzero(space.flat)
    pack_s = time.perf_counter() - t
    t = time.perf_counter()
    apply_packed_(space.flat, packed)
    apply_s = time.perf_counter() - t
    for what, seconds in (("pack", pack_s), ("apply", apply_s)):
        rows.append(
            {
                "pruner": f"mask cache: {what} the mask of the pruned {name}",
                "total_s": round(seconds, 3),
            }
        )
    return rows
