"""Loading and saving Hugging Face causal LMs (safetensors), from a local path or a hub id."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from sparse_merge.models.paramspace import ParamSpace
from sparse_merge.tracking.io import write_atomic_dir


def resolve(name_or_path: str | Path) -> Path:
    """A local directory for ``name_or_path``: the path itself, or the hub snapshot (download
    happens only here, and only for a hub id that is not a local directory)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download  # network only when a hub id is given

    return Path(
        snapshot_download(
            str(name_or_path), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]
        )
    )


def load_causal_lm(
    name_or_path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> nn.Module:
    """An ``AutoModelForCausalLM`` in eval mode on ``device`` with ``dtype``."""
    model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype)
    return model.to(device).eval()


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved with a model; a missing pad token falls back to eos."""
    tok = AutoTokenizer.from_pretrained(str(name_or_path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def save_causal_lm(
    model: nn.Module, out_dir: str | Path, tokenizer: PreTrainedTokenizerBase | None = None
) -> Path:
    """Save ``model`` (safetensors) and ``tokenizer`` so ``from_pretrained(out_dir)`` loads them.

    Written to a temporary sibling directory and renamed into place, so a crash never leaves a
    half-written model behind.
    """

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return write_atomic_dir(out_dir, write)


@torch.no_grad()
def load_genome(space: ParamSpace, name_or_path: str | Path) -> torch.Tensor:
    """The genome [P] of a checkpoint with ``space``'s architecture, read tensor by tensor from
    its safetensors files, so a second full model never sits in memory."""
    files = sorted(resolve(name_or_path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {name_or_path}")
    genome = torch.empty_like(space.flat)
    missing = {s.name for s in space.slots}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if key in missing:
                    space.view(genome, key).copy_(f.get_tensor(key))
                    missing.discard(key)
    if missing:
        raise KeyError(f"{name_or_path} lacks parameters {sorted(missing)[:5]}")
    return genome
