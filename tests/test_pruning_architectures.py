"""Every pruner on a tiny random model of every supported architecture (no download)."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sparse_merge.models.blocks import decoder_blocks, prunable_layers
from sparse_merge.pruning.base import Calibration, Pruner
from sparse_merge.pruning.sparsity import measure_sparsity
from tests.tiny_archs import ARCHS, VOCAB, build

PRUNER_FILES = sorted((Path(__file__).resolve().parents[1] / "conf" / "pruner").glob("*.yaml"))


def calib(n: int = 4, t: int = 10) -> Calibration:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (n, t), generator=g)
    attn = torch.ones(n, t, dtype=torch.long)
    attn[-1, 6:] = 0
    return Calibration(ids, attn)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_accessor_finds_the_blocks_and_their_linears(arch):
    model = build(arch)
    _, blocks = decoder_blocks(model)
    layers = prunable_layers(model)
    per_block = ARCHS[arch][2]
    assert len(blocks) == model.config.num_hidden_layers
    assert len(layers) == per_block * len(blocks)
    names = [layer.name for layer in layers]
    assert not any(k in n for n in names for k in ("embed", "wte", "wpe", "lm_head", "norm"))
    params = dict(model.named_parameters())
    for layer in layers:
        w = layer.weight  # [out, in]
        assert w.data_ptr() == params[layer.param_name].data_ptr()  # a view, not a copy
    if arch == "gpt2":  # Conv1D stores [in, out]; the accessor gives [out, in]
        fc = next(layer for layer in layers if layer.name.endswith("mlp.c_fc"))
        assert tuple(fc.weight.shape) == (128, 32)
        assert tuple(fc.module.weight.shape) == (32, 128)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("pruner_file", PRUNER_FILES, ids=lambda p: p.stem)
def test_every_pruner_prunes_every_architecture(arch, pruner_file):
    model = build(arch)
    cfg = OmegaConf.create({"seed": 0, "pruner": OmegaConf.load(pruner_file)})
    pruner = instantiate(cfg.pruner, _convert_="all")
    assert isinstance(pruner, Pruner)
    masks = pruner.prune(model, calib(), 0.5)
    layers = prunable_layers(model)
    assert set(masks) == {layer.param_name for layer in layers}
    for layer in layers:
        w = layer.module.weight  # parameter layout
        keep = masks[layer.param_name]
        assert keep.shape == w.shape
        assert (w[~keep] == 0).all()
    report = measure_sparsity(model)
    assert report.overall == pytest.approx(0.5, abs=0.02)
    out = model(input_ids=calib().input_ids).logits
    assert torch.isfinite(out).all()
