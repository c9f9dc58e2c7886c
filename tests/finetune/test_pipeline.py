"""The fine-tuning pipeline end to end on tiny settings, through the same run(cfg) the CLI calls."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from sparse_merge.app import execute
from sparse_merge.pruning.sparsity import measure_sparsity

from ..conftest import compose_cfg


def _run(tmp_path_factory, mode: str):
    tmp = tmp_path_factory.mktemp(mode)
    lora = ["lora=dense"] if mode == "dense" else ["lora=masked", f"lora.mode={mode}"]
    cfg = compose_cfg(["experiment=finetune_smoke", *lora, "hardware.num_threads=1"], tmp)
    metric = execute(cfg)
    return tmp / "run", metric


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    threads = torch.get_num_threads()  # hardware.num_threads=1 sets it process-wide
    yield {m: _run(tmp_path_factory, m) for m in ("sparse_to_sparse", "sparse_to_dense", "dense")}
    torch.set_num_threads(threads)


@pytest.mark.parametrize("mode", ["sparse_to_sparse", "sparse_to_dense"])
def test_masked_modes_keep_every_masked_weight_zero(runs, mode):
    run_dir, metric = runs[mode]
    results = json.loads((run_dir / "results.json").read_text())
    report = json.loads((run_dir / "mask_report.json").read_text())
    assert results["masked_nonzeros"] == 0 and report["ok"] and report["nonzero_masked"] == 0
    assert report["masked"] > 0 and len(report["layers"]) == 14  # 7 linears x 2 blocks
    assert results["sparsity"] == pytest.approx(0.5, abs=0.005)
    assert results["method"] == mode and metric == results["accuracy"]


def test_dense_baseline_reports_the_zeros_it_broke(runs):
    run_dir, _ = runs["dense"]
    results = json.loads((run_dir / "results.json").read_text())
    report = json.loads((run_dir / "mask_report.json").read_text())
    assert report["nonzero_masked"] > 0.9 * report["masked"] and not report["ok"]
    assert results["masked_nonzeros"] == report["nonzero_masked"]
    assert results["sparsity"] < 0.05 and results["sparsity_before"] == pytest.approx(
        0.5, abs=0.005
    )


def test_summary_has_the_sweep_keys(runs):
    run_dir, _ = runs["sparse_to_sparse"]
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("accuracy", "loss", "throughput", "sparsity", "tokens_per_s", "peak_memory_mb"):
        assert isinstance(summary[key], float), key
    assert summary["throughput"] > 0 and summary["loss"] > 0 and summary["steps"] == 6
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"
    logged = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logged if "train/loss" in x] == [2, 4, 6]


def test_merged_model_and_adapter_load(runs):
    run_dir, _ = runs["sparse_to_sparse"]
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "models" / "finetuned")
    assert measure_sparsity(merged).overall == pytest.approx(0.5, abs=0.005)
    base = AutoModelForCausalLM.from_pretrained(run_dir / "models" / "finetuned")
    adapted = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    assert any("lora_A" in n for n, _ in adapted.named_parameters())
    assert (run_dir / "checkpoints" / "trainer_state.pt").exists()


def test_finetune_keys_are_typed_and_checked(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_cfg(["experiment=finetune_smoke", "finetune.stepz=3"], tmp_path)
    cfg = compose_cfg(["experiment=finetune_smoke", "finetune.warmup=1.5"], tmp_path)
    from sparse_merge.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        execute(cfg)
    assert err.value.key == "finetune.warmup"


def test_masks_saved_and_reused_through_mask_path(runs, tmp_path):
    from sparse_merge.pruning.mask_io import load_masks

    first, _ = runs["sparse_to_sparse"]
    saved, meta = load_masks(first / "masks")
    assert meta["method"] == "magnitude" and meta["sparsity"] == 0.5
    assert len(saved) == 14 and all(m.dtype == torch.bool for m in saved.values())
    overrides = ["experiment=finetune_smoke", "lora.mode=sparse_to_sparse", "save_models=false"]
    cfg = compose_cfg([*overrides, f"lora.mask_path={first / 'masks'}", "sparsity=0.5"], tmp_path)
    execute(cfg)  # the saved masks are used instead of pruning again
    report = json.loads((tmp_path / "run" / "mask_report.json").read_text())
    assert report["ok"] and report["mask_sparsity"] == pytest.approx(0.5, abs=0.005)
    assert report["masked"] == sum(int((~m).sum()) for m in saved.values())


def test_missing_mask_path_is_a_config_error(tmp_path):
    from sparse_merge.errors import ConfigError

    cfg = compose_cfg(["experiment=finetune_smoke", f"lora.mask_path={tmp_path}/nope"], tmp_path)
    with pytest.raises(ConfigError) as err:
        execute(cfg)
    assert err.value.key == "lora.mask_path"
