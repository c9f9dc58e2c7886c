"""The memory plan: shapes from configs, totals that follow the formulae, refusals that name the
setting to change, and the merge pipeline refusing before it loads a model."""

import time

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from sparse_merge.errors import ConfigError
from sparse_merge.evolution import memory
from sparse_merge.evolution.memory import (
    ModelShape,
    evaluation_memory,
    evaluation_size,
    evolver_settings,
    plan_evolution,
    pruner_memory,
)
from sparse_merge.evolution.natural_niches import NaturalNiches
from sparse_merge.evolution.one_shot import OneShotMerge
from sparse_merge.evolution.schedules import CyclicSchedule
from sparse_merge.hardware import Hardware
from sparse_merge.models.blocks import prunable_layers
from sparse_merge.models.configs import config_names, load_config
from sparse_merge.models.paramspace import ParamSpace
from sparse_merge.models.source import PretrainedModels
from sparse_merge.pipelines import merge
from sparse_merge.pruning.magnitude import MagnitudePruner
from sparse_merge.tasks.suite import TaskSuite
from sparse_merge.tasks.toy import AdditionTask, ReversalTask
from sparse_merge.tracking.logger import RunLogger

GiB = 2**30
TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
}
# round numbers, so every row is exact: P = 1000 parameters, 600 of them prunable
SHAPE = ModelShape(
    numel=1000,
    prunable=600,
    largest=(20, 10),
    block=((10, 10), (20, 10)),
    hidden_size=10,
    intermediate_size=20,
    vocab_size=50,
    num_layers=2,
    num_heads=2,
    kv_dim=10,
)
EVAL = {"eval_batch": 2, "eval_length": 8, "full_logits": True}


def _eval_bytes(dtype: torch.dtype) -> int:
    return sum(p[1] for p in evaluation_memory(SHAPE, dtype, 2, 8, True))


@pytest.mark.parametrize(
    "config",
    [
        LlamaConfig(**TINY, tie_word_embeddings=True),
        LlamaConfig(**TINY, tie_word_embeddings=False),
        Qwen2Config(**TINY, tie_word_embeddings=True),
        Qwen2Config(**TINY, tie_word_embeddings=False),
    ],
    ids=["llama-tied", "llama-untied", "qwen2-tied", "qwen2-untied"],
)
def test_shape_from_config_matches_the_built_model(config):
    shape = ModelShape.from_config(config)
    model = AutoModelForCausalLM.from_config(config)  # real weights
    layers = prunable_layers(model)
    assert shape.numel == ParamSpace(model).numel
    assert shape.prunable == sum(layer.weight.numel() for layer in layers)
    assert shape.largest == (64, 32) and shape.largest_numel == 64 * 32
    assert shape.block == tuple(tuple(la.weight.shape) for la in layers if la.block == 0)
    assert (shape.hidden_size, shape.intermediate_size, shape.vocab_size) == (32, 64, 100)
    assert (shape.num_layers, shape.num_heads, shape.kv_dim) == (2, 4, 2 * 8)


@pytest.mark.parametrize("config_class", [LlamaConfig, Qwen2Config])
def test_tied_embeddings_count_once(config_class):
    tied = ModelShape.from_config(config_class(**TINY, tie_word_embeddings=True))
    untied = ModelShape.from_config(config_class(**TINY, tie_word_embeddings=False))
    assert untied.numel - tied.numel == 100 * 32  # the LM head: vocab x hidden


def test_shape_from_pretrained_reads_only_the_config(tmp_path):
    load_config("smollm2-135m").save_pretrained(tmp_path)  # config.json, no weights
    assert ModelShape.from_pretrained(tmp_path).numel == 134_515_008


@pytest.mark.parametrize(
    "name,numel",
    [("qwen2-0.5b", 494_032_768), ("qwen2-1.5b", 1_543_714_304), ("smollm2-135m", 134_515_008)],
)
def test_real_configs_have_their_parameter_counts(name, numel):
    assert name in config_names()
    config = load_config(name)
    assert config.tie_word_embeddings
    assert ModelShape.from_config(config).numel == numel


def test_unknown_config_name_is_an_error():
    with pytest.raises(ConfigError, match="qwen2-0.5b"):
        load_config("qwen2-72b")


def test_totals_follow_the_formulae():
    """Device archive, no pruning: live model + 2 parents + pop archive rows, plus the picks
    (2 P) at the end with the evaluation batch's working set."""
    b, P = 4, SHAPE.numel
    plans = {
        pop: plan_evolution(
            SHAPE, dtype=torch.float32, device="cpu", pop_size=pop, archive="device", **EVAL
        )
        for pop in (4, 8)
    }
    for pop, plan in plans.items():
        assert plan.totals()["cpu"] == (1 + 2 + pop + 2) * P * b + _eval_bytes(torch.float32)
        assert plan.totals()["host"] == P * b  # a checkpoint file mapped while loading
        assert plan.peak("host") == (plan.totals()["cpu"], "finish")  # one memory: they add up
        assert "disk" not in plan.totals()  # no run folder: nothing written
    assert plans[8].peak("host")[0] - plans[4].peak("host")[0] == 4 * P * b
    half = plan_evolution(
        SHAPE, dtype=torch.bfloat16, device="cpu", pop_size=8, archive="device", **EVAL
    )
    assert half.totals()["cpu"] - _eval_bytes(torch.bfloat16) == 13 * P * 2


def test_storage_moves_the_archive_between_devices(tmp_path):
    b, P = 4, SHAPE.numel
    common = {"dtype": torch.float32, "device": "cuda:0", "pop_size": 8, "checkpoint_every": 3}
    plans = {
        a: plan_evolution(SHAPE, archive=a, run_dir=tmp_path, iterations=100, **common, **EVAL)
        for a in ("device", "cpu", "disk")
    }
    device, cpu, disk = (plans[a].totals() for a in ("device", "cpu", "disk"))
    # on the device: the archive and the picks made from it (device), or a scratch genome to
    # stage the parents (cpu, disk; their picks are copies in host memory)
    assert device["cuda:0"] - cpu["cuda:0"] == (8 + 2 - 1) * P * b
    assert cpu["cuda:0"] == disk["cuda:0"]
    # in host memory: the pinned archive, rounded up to a power of two (32000 B -> 32768 B)
    archive = next(r for r in plans["cpu"].rows if r.what.startswith("archive"))
    assert (archive.device, archive.bytes) == ("host", 32768)
    # on disk: checkpoints holding the whole archive (old and new) vs one file per member
    assert device["disk"] == cpu["disk"] == 2 * 8 * P * b
    assert disk["disk"] == (8 + 3) * (P * b + 256)
    # the device-archive checkpoint passes through host memory
    moments = {r.what: r.when for r in plans["device"].rows if r.device == "host"}
    assert moments["host copy of the archive for a checkpoint"] == frozenset({"checkpoint"})


def test_pruning_adds_its_working_set_cache_scratch_and_final_copies():
    b, P, N = 4, SHAPE.numel, SHAPE.prunable
    big = 20 * 10  # the largest prunable layer
    pruner = MagnitudePruner()  # |W| scored one layer at a time, in float32
    parts = pruner_memory(pruner, SHAPE, torch.float32, (8, 8))
    assert sum(p[1] for p in parts) == 4 * big + big * 16  # each layer's mask dropped once applied
    # global granularity ranks every layer's scores together, and makes every mask first
    every = pruner_memory(MagnitudePruner("global"), SHAPE, torch.float32, (8, 8))
    assert sum(p[1] for p in every) == 4 * N + N + N * (4 + 16)
    plan = plan_evolution(
        SHAPE,
        dtype=torch.float32,
        device="cpu",
        pop_size=8,
        archive="device",
        pruner=pruner,
        target=0.5,
        iterations=2,  # 2 parents + 2 children fill 4 slots
        prune_cache_mb=1,
        prune_sparsities=1,
        **EVAL,
    )
    rows = {r.what: r for r in plan.rows}
    assert rows["scratch genome (first parent)"].bytes == P * b
    assert rows["final prune: one member below the target, copied and pruned"].bytes == P * b
    cache = rows["pruning cache (packed keep-masks)"].bytes
    assert cache == 4 * 2 * 125 + 125 + (1 << 24)
    working = max(sum(p[1] for p in parts), _eval_bytes(torch.float32))  # pruning or a batch
    # the search: model, parents, archive, scratch and the cache
    search = (1 + 2 + 8 + 1) * P * b + cache + working
    # the end: one pruned copy at a time and the picks; the scratch and the cache are freed
    finish = (1 + 2 + 8) * P * b + P * b + 2 * P * b + working
    assert sum(r.bytes for r in plan.rows if r.when is None or "finish" in r.when) == finish
    assert plan.totals()["cpu"] == max(finish, search - cache)
    assert plan.peak("host")[0] == max(finish, search)


def test_an_impossible_config_is_refused_in_under_a_second():
    ModelShape.from_config(load_config("qwen2-0.5b"))  # imports the Qwen2 modelling code once
    start = time.perf_counter()
    shape = ModelShape.from_config(load_config("qwen2-1.5b"))
    plan = plan_evolution(
        shape, dtype=torch.bfloat16, device="cpu", pop_size=10_000, archive="device", **EVAL
    )
    with pytest.raises(ConfigError) as info:
        plan.check()  # measured: no machine has 28 TiB free
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0
    err = info.value
    assert err.key == "evolver.archive" and err.value == "device"
    assert "evolver.archive=disk" in str(err) and "evolver.pop_size" in str(err)
    assert "28.1 TiB" in str(err)


def test_the_refusal_says_which_population_fits():
    P, b = SHAPE.numel, 4
    plan = plan_evolution(
        SHAPE, dtype=torch.float32, device="cuda:0", pop_size=64, archive="device", **EVAL
    )
    free = plan.peak("cuda:0")[0] - 10 * P * b  # 10 slots too many
    with pytest.raises(
        ConfigError,
        match=r"evolver.archive=cpu or disk, or lower evolver.pop_size \(at most 54 fits\)",
    ):
        plan.check({"cuda:0": free})
    plan.check({"cuda:0": free + 10 * P * b, "host": 1 << 40})  # exactly enough


def test_the_refusal_names_the_cache_or_the_dtype():
    def cached(mb: int):
        return plan_evolution(
            SHAPE,
            dtype=torch.float32,
            device="cuda:0",
            pop_size=4,
            archive="device",
            pruner=MagnitudePruner(),
            prune_cache_mb=mb,
            **EVAL,
        )

    free = {"host": cached(512).peak("host")[0] - 256 * 2**20}
    with pytest.raises(ConfigError, match="evolver.prune_cache_mb to at most") as info:
        cached(512).check(free)
    assert info.value.key == "evolver.prune_cache_mb"
    # the advice fits: the mask being packed and the chunk stay whatever the setting (the
    # advice counted them as cache, and the plan it named was refused again)
    cached(int(str(info.value).rsplit("at most ", 1)[1])).check(free)
    no_archive = plan_evolution(SHAPE, dtype=torch.float32, device="cpu", pop_size=0, archive=None)
    assert not any("archive" in r.what for r in no_archive.rows)
    with pytest.raises(ConfigError, match="hardware.dtype=bfloat16") as info:
        no_archive.check({"host": 1000})
    assert info.value.key == "hardware.dtype"


def test_disk_archive_needs_a_run_folder():
    with pytest.raises(ConfigError, match="evolver.archive"):
        plan_evolution(SHAPE, dtype=torch.float32, device="cpu", pop_size=4, archive="disk")


def test_format_lists_rows_and_peaks(tmp_path):
    plan = plan_evolution(
        SHAPE,
        dtype=torch.bfloat16,
        device="cpu",
        pop_size=4,
        archive="disk",
        run_dir=tmp_path,
        **EVAL,
    )
    text = plan.format()
    assert "P = 1,000 parameters" in text and "archive disk x 4" in text
    assert "archive files" in text and "peak host (cpu + host)" in text and "peak disk" in text


def test_settings_come_from_any_evolver():
    evolver = NaturalNiches(
        pop_size=6, iterations=20, archive="cpu", schedule=CyclicSchedule(period=10)
    )
    nn = evolver_settings(evolver, target=0.5)
    assert (nn["pop_size"], nn["archive"], nn["iterations"]) == (6, "cpu", 20)
    assert nn["prune_sparsities"] == 10  # one per step of a cycle
    one = evolver_settings(OneShotMerge(), target=0.5)  # keeps no archive
    assert (one["pop_size"], one["archive"]) == (0, None)


def test_evaluation_size_of_toy_tasks(tokenizer):
    tasks = TaskSuite(
        {
            "addition": AdditionTask(1, 2, n_select=5, n_heldout=1),
            "reversal": ReversalTask(1, 3, n_select=3, n_heldout=1),
        }
    )
    size = evaluation_size(tasks, tokenizer, default_length=128)
    longest = max(
        len(e.prompt) + t.selection.max_new_tokens + 1
        for t in tasks.tasks.values()
        for e in t.selection.examples
    )
    assert size == {"eval_batch": 5, "eval_length": longest, "full_logits": False}


def test_run_merge_refuses_before_loading_a_model(tmp_path, tokenizer, monkeypatch):
    config = load_config("qwen2-1.5b")
    parents = {}
    for name in ("a", "b"):
        config.save_pretrained(tmp_path / name)  # a config, no weights
        parents[name] = str(tmp_path / name)
    tokenizer.save_pretrained(tmp_path / "tok")

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded before the memory check")

    monkeypatch.setattr(merge, "load_causal_lm", never)
    monkeypatch.setattr(merge, "load_genome", never)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        merge.run_merge(
            PretrainedModels("big", parents=parents, tokenizer=str(tmp_path / "tok")),
            TaskSuite({"addition": AdditionTask(1, 1, n_select=2, n_heldout=2)}),
            NaturalNiches(pop_size=10_000, iterations=2, archive="device"),
            None,
            Hardware("cpu", "bfloat16"),
            RunLogger(console=False),
            seed=0,
            sparsity=0.5,
            run_dir=tmp_path / "run",
        )
    assert info.value.key == "evolver.archive" and "evolver.pop_size" in str(info.value)
    assert "hardware.memory_check=warn" in str(info.value)
    assert time.perf_counter() - start < 10


def test_memory_check_warn_runs_what_the_plan_refuses(tmp_path, tokenizer, monkeypatch, caplog):
    """``hardware.memory_check=warn``: the plan's refusal is logged and the run goes on to
    load its model."""
    config = load_config("smollm2-135m")
    parents = {}
    for name in ("a", "b"):
        config.save_pretrained(tmp_path / name)
        (tmp_path / name / "model.safetensors").touch()  # never read: the load is stubbed
        parents[name] = str(tmp_path / name)
    tokenizer.save_pretrained(tmp_path / "tok")

    class Loaded(Exception):
        pass

    def loaded(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(merge, "load_causal_lm", loaded)

    def run(check: str) -> None:
        merge.run_merge(
            PretrainedModels("small", parents=parents, tokenizer=str(tmp_path / "tok")),
            TaskSuite({"addition": AdditionTask(1, 1, n_select=2, n_heldout=2)}),
            NaturalNiches(pop_size=4, iterations=2, archive="device"),
            None,
            Hardware("cpu", "bfloat16", memory_check=check),
            RunLogger(console=False),
            seed=0,
            sparsity=0.5,
            run_dir=tmp_path / "run",
        )

    monkeypatch.setattr(memory, "host_available", lambda: 1 << 20)  # 1 MiB free
    with pytest.raises(ConfigError, match="hardware.memory_check=warn"):
        run("refuse")
    with pytest.raises(Loaded), caplog.at_level("WARNING"):
        run("warn")
    assert "hardware.memory_check=warn: running anyway" in caplog.text
    assert "1.0 MiB are free" in caplog.text


def test_memory_check_takes_refuse_or_warn():
    with pytest.raises(ConfigError, match=r"memory_check='ignore' is not allowed.*refuse.*warn"):
        Hardware(memory_check="ignore")


@pytest.mark.parametrize(
    "arch, hessian",
    [
        ("llama", 6 * 32**2 + 64**2),  # q, k, v, o, gate, up read hidden 32; down reads 64
        ("mixtral", 4 * 32**2 + 4 * 32**2 + 4 * 32**2),  # q, k, v, o; 4 experts x (gate_up, down)
    ],
)
def test_sparsegpt_hessians_count_one_per_expert(arch, hessian):
    """SparseGPT keeps a Hessian per expert of a fused expert parameter, not one per tensor."""
    from tests.tiny_archs import ARCHS

    assert ModelShape.from_config(ARCHS[arch][1]).block_hessian == hessian


@pytest.mark.slow
def test_memory_bench_measures_one_configuration(tmp_path):
    """``benchmarks/bench_memory.py --one``, the command behind its rows and its GPU rows (here
    on the CPU): two steps of SmolLM2-135M-config models in bfloat16 with a disk archive give
    a step time, a host peak the plan predicts within a third, and no device peak off CUDA.
    Launched by a process whose own peak was larger (``make bench`` runs it after the engine
    benchmark), which a child's ``ru_maxrss`` would report as its own."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    big = torch.ones(4 * 2**30 // 4)  # 4 GiB written, so resident: this process's peak
    del big
    bench = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_memory.py"
    command = [sys.executable, str(bench), "--one", "smollm2-135m", "4", "disk", "cpu"]
    done = subprocess.run([*command, str(tmp_path)], capture_output=True, text=True, check=True)
    got = json.loads(done.stdout.splitlines()[-1])
    measured = got["peak"] - got["baseline"]
    assert got["step_s"] > 0 and got["device_peak"] is None
    assert abs(got["predicted"] - measured) < measured / 3
    assert len(list(tmp_path.rglob("*.safetensors"))) == 4  # the two parents and two children


def test_the_plan_counts_the_baselines_genomes():
    """``baselines=classic`` keeps each method's best genome on the model's device through the
    report (6 methods: 18-21 GB at Qwen2-1.5B in bfloat16), which the plan did not count."""
    common = dict(dtype=torch.bfloat16, device="cpu", pop_size=4, archive="cpu", report=True)
    without = plan_evolution(SHAPE, **common)
    with_six = plan_evolution(SHAPE, baselines=6, **common)
    genome = SHAPE.numel * 2
    (row,) = [r for r in with_six.rows if r.what.startswith("baselines")]
    assert row.bytes == 7 * genome and row.when == frozenset({"report"})
    assert with_six.peak("host")[0] > without.peak("host")[0]
