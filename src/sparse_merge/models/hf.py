"""Loading and saving Hugging Face causal LMs (safetensors), from a local path or a hub id."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_model
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from sparse_merge.errors import ConfigError, check_int
from sparse_merge.models.paramspace import ParamSpace
from sparse_merge.tracking.io import write_atomic_dir


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def check_attention_arch(arch: Mapping[str, Any], key: str = "arch") -> None:
    """The attention shape of a decoder config (``hidden_size``, ``num_attention_heads``,
    ``num_key_value_heads``; keys under ``key``) as one ``ConfigError`` instead of a
    transformers traceback: whole numbers >= 1, the heads dividing the hidden size (each head
    gets ``hidden_size / num_attention_heads`` dimensions) and the key/value heads dividing the
    query heads (grouped-query attention shares each key/value head among a whole group)."""
    hidden, heads = arch.get("hidden_size"), arch.get("num_attention_heads")
    kv = arch.get("num_key_value_heads")
    for name, value in (
        ("hidden_size", hidden),
        ("num_attention_heads", heads),
        ("num_key_value_heads", kv),
    ):
        if value is not None:
            check_int(f"{key}.{name}", value, minimum=1)
    if hidden is not None and heads is not None and hidden % heads:
        raise ConfigError(
            f"{key}.num_attention_heads",
            heads,
            f"a divisor of hidden_size={hidden} ({_divisors(hidden)}): each head gets "
            "hidden_size / num_attention_heads dimensions",
        )
    if heads is not None and kv is not None and heads % kv:
        raise ConfigError(
            f"{key}.num_key_value_heads",
            kv,
            f"a divisor of num_attention_heads={heads} ({_divisors(heads)}): each "
            "key/value head serves num_attention_heads / num_key_value_heads query heads",
        )


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
        if not (tmp / "config.json").exists():
            # transformers writes only on torch.distributed rank 0, but a cache is written by
            # whichever process of a launch holds its lock: then the weights go out as they are
            model.config.save_pretrained(tmp)
            save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return write_atomic_dir(out_dir, write)


@torch.no_grad()
def _tied_names(model: nn.Module) -> dict[str, str]:
    """Every parameter name that shares its tensor with an earlier one (a tied LM head), and
    that earlier one's name."""
    first: dict[int, str] = {}
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.data_ptr() in first:
            out[name] = first[p.data_ptr()]
        else:
            first[p.data_ptr()] = name
    return out


def load_genome(space: ParamSpace, name_or_path: str | Path) -> torch.Tensor:
    """The genome [P] of a checkpoint with ``space``'s architecture, read tensor by tensor from
    its safetensors files, so a second full model never sits in memory. Parameters not found
    under their in-memory names (fused MoE experts, saved per expert by transformers; keys
    saved without the base model's prefix, as GPT-2's hub checkpoints are) come from a
    ``from_pretrained`` of the checkpoint (its key conversion), one more model in memory while
    it runs. A tensor the model ties to another (an LM head tied to the embedding) must equal
    it in the checkpoint: a parent with a head of its own is refused, not silently dropped."""
    files = sorted(resolve(name_or_path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {name_or_path}")
    genome = torch.empty_like(space.flat)
    missing = {s.name for s in space.slots}
    tied = _tied_names(space.model)  # alias -> the slot's name
    aliases = []  # (file, alias) found in the checkpoint, checked once every slot is read
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if key in missing:
                    space.view(genome, key).copy_(f.get_tensor(key))
                    missing.discard(key)
                elif key in tied:
                    aliases.append((file, key))
    for file, key in aliases:
        if tied[key] in missing:
            continue
        with safe_open(str(file), framework="pt", device="cpu") as f:
            if not torch.equal(f.get_tensor(key).to(genome.dtype), space.view(genome, tied[key])):
                raise ValueError(
                    f"{name_or_path}: {key} is not its {tied[key]}, to which this model ties "
                    "it (a checkpoint with untied weights, merged as tied, would lose it)"
                )
    if missing:
        # transformers 5 fuses MoE experts in memory (experts.gate_up_proj [E, 2*I, H]) but
        # saves and reads them per expert (experts.0.gate_proj.weight, Mixtral's w1/w2/w3),
        # and older checkpoints drop the base model's prefix: its loader converts both
        model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=space.flat.dtype)
        params = dict(model.named_parameters(remove_duplicate=True))
        for name in sorted(missing):
            if name in params:
                space.view(genome, name).copy_(params[name].detach())
                missing.discard(name)
        del model, params
    if missing:
        raise KeyError(f"{name_or_path} lacks parameters {sorted(missing)[:5]}")
    return genome
