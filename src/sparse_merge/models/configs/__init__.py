"""Configs (no weights) of real models, to plan memory and build random-weight stand-ins offline.

One JSON file per model, in the format of the model's ``config.json`` on the hub:
``qwen2-0.5b``, ``qwen2-1.5b`` (Qwen2, tied embeddings, grouped-query attention with 2 KV heads)
and ``smollm2-135m`` (Llama, tied embeddings, 3 KV heads).
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from sparse_merge.errors import ConfigError

HERE = Path(__file__).resolve().parent


def config_names() -> list[str]:
    """The names of the configs shipped here."""
    return sorted(p.stem for p in HERE.glob("*.json"))


def load_config(name: str) -> PretrainedConfig:
    """The transformers config of model ``name`` (one of ``config_names()``)."""
    path = HERE / f"{name}.json"
    if not path.is_file():
        raise ConfigError("model config", name, "one of " + ", ".join(config_names()))
    values = json.loads(path.read_text())
    return AutoConfig.for_model(values.pop("model_type"), **values)
