"""Mixture-of-experts models with fused experts, as transformers 5 stores them
(``experts.gate_up_proj`` [E, 2*I, H], ``experts.down_proj`` [E, H, I]): every pruner prunes
each expert's gate, up and down projection on its own with exact counts, the router stays dense
(unless asked), Wanda and SparseGPT see the tokens routed to each expert, masks round trip,
masked LoRA on the experts keeps pruned weights exactly zero, and the merge pipeline runs on a
tiny local MoE checkpoint."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sparse_merge.errors import ConfigError
from sparse_merge.finetune.lora import LoraAdapter, MaskedExpertLora
from sparse_merge.models.blocks import ExpertStack, decoder_blocks, prunable_layers
from sparse_merge.pruning.base import Calibration
from sparse_merge.pruning.magnitude import MagnitudePruner
from sparse_merge.pruning.mask_io import apply_masks, load_masks, save_masks
from sparse_merge.pruning.sparsegpt import SparseGPTPruner, sparsegpt_prune_
from sparse_merge.pruning.sparsity import measure_sparsity
from sparse_merge.pruning.stats import mask_stats
from sparse_merge.pruning.validate import validate_masks
from sparse_merge.pruning.wanda import WandaPruner, dense_input_norms, wanda_scores
from tests.tiny_archs import ARCHS, MOE_ARCHS, VOCAB, build

from .conftest import compose_cfg

PRUNER_FILES = sorted((Path(__file__).resolve().parents[1] / "conf" / "pruner").glob("*.yaml"))
EXPERT_TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


def calib(n: int = 6, t: int = 12) -> Calibration:
    """Random sequences, the last one half padding (padding must not reach any statistic)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (n, t), generator=g)
    attn = torch.ones(n, t, dtype=torch.long)
    attn[-1, t // 2 :] = 0
    return Calibration(ids, attn)


def routers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the router weights (``mlp.gate``, Qwen2-MoE's ``shared_expert_gate``)."""
    return {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if n.endswith(("mlp.gate.weight", "shared_expert_gate.weight"))
    }


def expected_pruned(pruner, out: int, n_in: int, sparsity: float) -> int:
    """Zeros one [out, in] projection gets from ``pruner``, as a linear of that shape would."""
    if pruner.nm is not None:
        n, m = pruner.nm
        return out * n_in * (m - n) // m
    granularity = pruner.granularity
    if granularity == "row":
        return out * round(sparsity * n_in)
    if granularity == "layer":
        return round(sparsity * out * n_in)
    assert granularity in ("channel", "head")  # experts: whole output channels
    return round(sparsity * out) * n_in


def expert_layers(model):
    return [layer for layer in prunable_layers(model) if layer.is_experts]


# ---- the layout --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_fused_experts_are_layers_split_into_per_expert_units(arch):
    model = build(arch)
    config = model.config
    n_experts = getattr(config, "num_local_experts", None) or config.num_experts
    inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    hidden = config.hidden_size
    layers = expert_layers(model)
    assert [layer.name.rsplit(".", 1)[-1] for layer in layers] == ["gate_up_proj", "down_proj"] * 2
    params = dict(model.named_parameters())
    for layer in layers:
        p = params[layer.param_name]
        assert isinstance(layer.module, ExpertStack) and layer.module.weight is p
        assert p.dim() == 3 and p.shape[0] == n_experts
        assert layer.weight.data_ptr() == p.data_ptr()  # a view: pruning writes through it
        assert tuple(layer.weight.shape) == (p.shape[0] * p.shape[1], p.shape[2])
        units = layer.units
        if layer.name.endswith("gate_up_proj"):  # [E, 2*I, H]: gate rows :I, up rows I:
            assert tuple(p.shape) == (n_experts, 2 * inter, hidden)
            assert [(u.expert, u.part) for u in units[:2]] == [(0, "gate"), (0, "up")]
            assert len(units) == 2 * n_experts
        else:  # [E, H, I]: the input is the intermediate activation
            assert tuple(p.shape) == (n_experts, hidden, inter)
            assert len(units) == n_experts
        out = p.shape[1]
        for u in units:  # each unit is rows of one expert's [out, in] matrix
            local = slice(u.start - u.expert * out, u.stop - u.expert * out)
            assert torch.equal(layer.weight[u.rows], p[u.expert][local])
            if u.part == "gate":
                assert local == slice(0, inter)
    names = {layer.param_name for layer in prunable_layers(model)}
    assert not names & set(routers(model))  # the router is not prunable by default
    with_router = {layer.param_name for layer in prunable_layers(model, prune_router=True)}
    assert with_router - names == set(routers(model))


# ---- every pruner, per expert, exact -----------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.5, 0.3])
@pytest.mark.parametrize("arch", MOE_ARCHS)
@pytest.mark.parametrize("pruner_file", PRUNER_FILES, ids=lambda p: p.stem)
def test_every_pruner_prunes_every_expert_exactly_and_leaves_the_router(
    arch, pruner_file, sparsity
):
    cfg = OmegaConf.create({"seed": 0, "pruner": OmegaConf.load(pruner_file)})
    pruner = instantiate(cfg.pruner, _convert_="all")
    if pruner.nm is not None and sparsity != 0.5:
        pytest.skip("an N:M pattern fixes the sparsity")
    model = build(arch)
    before = routers(model)
    masks = pruner.prune(model, calib(), sparsity)
    assert set(masks) == {layer.param_name for layer in prunable_layers(model)}
    for layer in expert_layers(model):
        p = layer.parameter  # [E, out, in]
        assert masks[layer.param_name].shape == p.shape
        assert (p[~masks[layer.param_name]] == 0).all()
        for unit in layer.units:  # each expert's gate, up, down on its own
            w = layer.weight[unit.rows]
            want = expected_pruned(pruner, w.shape[0], w.shape[1], sparsity)
            assert int((w == 0).sum()) == want, (layer.name, unit)
        per_expert = expected_pruned(
            pruner, p.shape[1] // len(layer.module.parts), p.shape[2], sparsity
        ) * len(layer.module.parts)
        for e in range(p.shape[0]):
            assert int((p[e] == 0).sum()) == per_expert
    after = routers(model)
    assert all(torch.equal(before[n], after[n]) for n in before)  # dense, untouched
    assert torch.isfinite(model(input_ids=calib().input_ids).logits).all()


@pytest.mark.parametrize(
    "pruner",
    [
        MagnitudePruner(prune_router=True),
        WandaPruner(n_calibration=8, batch_size=4, granularity="layer", prune_router=True),
        SparseGPTPruner(n_calibration=8, batch_size=4, prune_router=True),
    ],
    ids=["magnitude", "wanda", "sparsegpt"],
)
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_prune_router_prunes_the_routers_too(arch, pruner):
    model = build(arch)
    masks = pruner.prune(model, calib(), 0.5)
    params = dict(model.named_parameters())
    for name in routers(model):
        assert name in masks
        assert int((params[name] == 0).sum()) == round(0.5 * params[name].numel())


def test_prune_router_is_a_pruner_setting_of_the_config():
    cfg = compose_cfg(["pruner=wanda", "+pruner.prune_router=true"])
    assert instantiate(cfg.pruner, _convert_="all").prune_router is True
    assert instantiate(compose_cfg(["pruner=sparsegpt"]).pruner).prune_router is False


# ---- what Wanda and SparseGPT see: the tokens routed to each expert ----------------------------


def routed_inputs(model, batch: Calibration) -> dict[int, dict]:
    """Per block: the hidden states entering the MoE block [N, H], the top-k experts of each
    token [N, k] (the router's own output) and the padding mask [N], by hooks on the router."""
    _, blocks = decoder_blocks(model)
    seen: dict[int, dict] = {}
    handles = []
    for i, block in enumerate(blocks):

        def hook(module, args, out, i=i):
            seen[i] = {"x": args[0].reshape(-1, args[0].shape[-1]), "top": out[2]}

        handles.append(block.mlp.gate.register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    for h in handles:
        h.remove()
    for v in seen.values():
        v["valid"] = batch.attention_mask.bool().reshape(-1)
    return seen


def manual_expert_inputs(model, seen: dict, block: int, expert: int):
    """(gate_up input, down input) of ``expert`` in ``block``, computed here from scratch."""
    x, top, valid = seen[block]["x"], seen[block]["top"], seen[block]["valid"]
    rows = x[(top == expert).any(-1) & valid]  # the non-padding tokens routed to it
    experts = decoder_blocks(model)[1][block].mlp.experts
    inter = experts.down_proj.shape[-1]
    w = experts.gate_up_proj[expert]
    h = F.silu(rows @ w[:inter].t()) * (rows @ w[inter:].t())
    return rows, h


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_wanda_norms_are_over_the_tokens_routed_to_each_expert(arch):
    model = build(arch)
    batch = calib()
    stats = dense_input_norms(model, batch, batch_size=len(batch))
    seen = routed_inputs(model, batch)
    for layer in expert_layers(model):
        norms = stats[layer.name].norms()  # [E, in]
        assert (stats[layer.name].tokens > 0).all()  # every expert got tokens (a real check)
        for e in range(norms.shape[0]):
            gate_up_in, down_in = manual_expert_inputs(model, seen, layer.block, e)
            x = gate_up_in if layer.name.endswith("gate_up_proj") else down_in
            torch.testing.assert_close(norms[e], x.float().norm(dim=0), rtol=1e-5, atol=1e-6)
            assert int(stats[layer.name].tokens[e]) == x.shape[0]
        all_tokens = seen[layer.block]["x"][seen[layer.block]["valid"]].norm(dim=0)
        if layer.name.endswith("gate_up_proj"):  # not an all-tokens approximation
            assert not torch.allclose(norms[0], all_tokens)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_sparsegpt_prunes_each_expert_with_its_own_hessian(arch):
    """Block 0 sees the dense model's inputs: its experts must equal SparseGPT run by hand on
    each expert's gate, up and down with the Hessian of the tokens routed to that expert."""
    model = build(arch)
    batch = calib()
    seen = routed_inputs(model, batch)
    reference = copy.deepcopy(model)
    experts = decoder_blocks(reference)[1][0].mlp.experts
    inter = experts.down_proj.shape[-1]
    with torch.no_grad():
        for e in range(experts.gate_up_proj.shape[0]):
            x, h = manual_expert_inputs(reference, seen, 0, e)
            hx, hh = x.t() @ x, h.t() @ h
            w = experts.gate_up_proj[e]
            for rows in (slice(0, inter), slice(inter, 2 * inter)):
                sparsegpt_prune_(w[rows], hx, 0.5, block_size=16)
            sparsegpt_prune_(experts.down_proj[e], hh, 0.5, block_size=16)
    SparseGPTPruner(n_calibration=8, batch_size=len(batch), block_size=16).prune(model, batch, 0.5)
    got = decoder_blocks(model)[1][0].mlp.experts
    torch.testing.assert_close(got.gate_up_proj, experts.gate_up_proj, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.down_proj, experts.down_proj, rtol=1e-4, atol=1e-5)


def test_an_expert_no_token_reaches_is_ranked_by_magnitude():
    w = torch.randn(3 * 4, 8)  # 3 experts of [4, 8]
    norms = torch.rand(3, 8) + 0.1
    norms[1] = 0  # expert 1 saw no token
    scores = wanda_scores(w, norms).view(3, 4, 8)
    torch.testing.assert_close(scores[1], w.view(3, 4, 8)[1].abs())
    torch.testing.assert_close(scores[0], w.view(3, 4, 8)[0].abs() * norms[0])


# ---- mask files, validation, per-expert statistics ---------------------------------------------


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_masks_save_load_validate_and_stats_per_expert(arch, tmp_path):
    model = build(arch)
    masks = WandaPruner(n_calibration=8, batch_size=4).prune(model, calib(), 0.5)
    save_masks(tmp_path / "m", masks, {"method": "wanda", "sparsity": 0.5})
    loaded, meta = load_masks(tmp_path / "m")
    assert meta["method"] == "wanda" and set(loaded) == set(masks)
    assert all(torch.equal(loaded[n], masks[n]) for n in masks)
    report = validate_masks(model, loaded, 0.5)
    assert report["ok"] and report["nonzero_masked"] == 0
    assert report["mask_sparsity"] == pytest.approx(0.5)

    fresh = build(arch)  # the saved masks applied to the dense model give the same zeros
    apply_masks(fresh, loaded)
    assert validate_masks(fresh, loaded, 0.5)["ok"]
    layer = expert_layers(fresh)[0]
    with torch.no_grad():  # one pruned expert weight made non-zero is caught
        idx = (~loaded[layer.param_name]).nonzero()[0].tolist()
        layer.parameter[tuple(idx)] = 1.0
    bad = validate_masks(fresh, loaded, 0.5)
    assert not bad["ok"] and bad["nonzero_masked"] == 1

    rows = {r["layer"]: r for r in mask_stats(masks)}
    n_experts = expert_layers(model)[0].num_experts
    for lyr in expert_layers(model):
        assert lyr.name not in rows  # one row per expert, not per fused parameter
        for e in range(n_experts):
            row = rows[f"{lyr.name}[{e}]"]
            assert row["sparsity"] == 0.5
            assert row["numel"] == lyr.parameter[e].numel()
    assert "model.layers.0.mlp.experts.gate_up_proj[3]" in rows
    measured = measure_sparsity(model)
    assert measured.overall == pytest.approx(0.5)
    assert measured.layers["model.layers.1.mlp.experts.down_proj[2]"] == 0.5


# ---- masked LoRA on the experts ----------------------------------------------------------------


def train_a_little(model, steps: int = 3) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = calib().input_ids
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("mode", ["sparse_to_dense", "sparse_to_sparse"])
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_masked_lora_on_experts_merges_to_exact_zeros(arch, mode, tmp_path):
    model = build(arch)
    masks = WandaPruner(n_calibration=8, batch_size=4).prune(model, calib(), 0.5)
    pruned = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapter = LoraAdapter(
        mode=mode, r=2, target_modules=["q_proj", "v_proj"], target_parameters=EXPERT_TARGETS
    )
    wrapped = adapter.wrap(model, masks)
    expert_lora = [m for m in wrapped.modules() if isinstance(m, MaskedExpertLora)]
    assert len(expert_lora) == 2 * 2 and all(m.mask_source == "weight" for m in expert_lora)
    train_a_little(wrapped)
    ids = calib().input_ids
    with torch.no_grad():
        trained = wrapped(input_ids=ids).logits
    adapter.save(wrapped, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(saved["target_parameters"]) == sorted(EXPERT_TARGETS)

    merged = adapter.merge(wrapped)
    assert type(merged) is type(build(arch))
    report = validate_masks(merged, masks, 0.5)
    assert report["ok"] and report["nonzero_masked"] == 0
    params = dict(merged.named_parameters())
    for layer in expert_layers(merged):  # the update reached every expert's kept weights
        keep = masks[layer.param_name]
        changed = (params[layer.param_name] != pruned[layer.param_name]) & keep
        assert changed.flatten(1).any(-1).all()
        assert (params[layer.param_name][~keep] == 0).all()
    assert all(torch.equal(params[n], pruned[n]) for n in routers(merged))  # router frozen
    if mode == "sparse_to_sparse":  # the merged model is the trained one
        with torch.no_grad():
            torch.testing.assert_close(merged(input_ids=ids).logits, trained, rtol=0, atol=1e-6)


def test_dense_lora_on_experts_breaks_the_zeros():
    model = build("mixtral")
    masks = MagnitudePruner().prune(model, None, 0.5)
    adapter = LoraAdapter(
        mode="dense", r=2, target_modules=["q_proj"], target_parameters=EXPERT_TARGETS
    )
    wrapped = adapter.wrap(model, masks)
    train_a_little(wrapped, steps=1)
    merged = adapter.merge(wrapped)
    layer = expert_layers(merged)[0]
    assert (layer.parameter[~masks[layer.param_name]] != 0).any()


def test_lora_targets_on_experts_are_checked():
    model = build("mixtral")
    masks = MagnitudePruner().prune(model, None, 0.5)
    with pytest.raises(ConfigError, match="target_parameters=\\[experts.down_proj"):
        LoraAdapter(mode="sparse_to_dense", target_modules=["q_proj", "experts"]).wrap(model, masks)
    with pytest.raises(ConfigError, match="lora.target_parameters"):
        LoraAdapter(
            mode="sparse_to_dense", target_modules=["q_proj"], target_parameters=["q_proj.weight"]
        ).wrap(model, masks)
    with pytest.raises(ConfigError, match="lora_dropout"):
        LoraAdapter(target_parameters=EXPERT_TARGETS, lora_dropout=0.1)


# ---- the merge pipeline ------------------------------------------------------------------------


def save_tiny_parents(arch: str, root: Path) -> dict[str, Path]:
    """A base and two parents a little away from it, saved with the character tokenizer."""
    from sparse_merge.models.tokenizer import char_tokenizer

    tok = char_tokenizer()
    cls, config, _ = ARCHS[arch]
    config = copy.deepcopy(config)
    config.vocab_size = len(tok)
    config.pad_token_id, config.bos_token_id = tok.pad_token_id, tok.bos_token_id
    config.eos_token_id = tok.eos_token_id
    torch.manual_seed(0)
    base = cls(config).eval()
    paths = {}
    for i, name in enumerate(("base", "math", "code")):
        model = copy.deepcopy(base)
        if i:
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=g))
        model.save_pretrained(root / name)  # transformers writes the experts one by one
        tok.save_pretrained(root / name)
        paths[name] = root / name
    return paths


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_merge_pipeline_evolves_a_tiny_moe(arch, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from sparse_merge.app import execute

    paths = save_tiny_parents(arch, tmp_path / "models")
    overrides = [
        "model=hf",
        f"model.base={paths['base']}",
        f"model.parents={{math: {paths['math']}, code: {paths['code']}}}",
        "task=toy_smoke",
        *(
            f"task.tasks.{t}.{k}=4"
            for t in ("addition", "reversal")
            for k in ("n_select", "n_heldout")
        ),
        "logger=none",
        "pruner=wanda",
        "calibration.n=8",
        "evolver=natural_niches",
        "evolver.pop_size=4",
        "evolver.iterations=2",
        "evolver.schedule.period=2",
        "sparsity=0.5",
        "save_models=true",
    ]
    with safe_open(str(paths["math"] / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())  # noqa: SIM118 - safe_open is not a mapping
    assert not any("gate_up_proj" in k for k in keys)  # saved per expert: load_genome converts
    execute(compose_cfg(overrides, tmp_path))
    run_dir = tmp_path / "run"
    results = json.loads((run_dir / "results.json").read_text())
    rows = {r["model"]: r for r in results["models"]}
    assert {"base", "math", "code", "best"} <= set(rows)
    assert rows["best"]["sparsity"] == pytest.approx(0.5)
    best = AutoModelForCausalLM.from_pretrained(run_dir / "models" / "best")
    measured = measure_sparsity(best)
    experts = [k for k in measured.layers if "experts" in k]
    assert len(experts) == 2 * 2 * 4  # two layers, two fused parameters, four experts
    assert all(measured.layers[k] == 0.5 for k in experts)  # every expert, exactly
    assert all(int((w == 0).sum()) == 0 for w in routers(best).values())  # router dense
