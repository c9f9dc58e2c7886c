"""The three use-case presets (conf/experiment/{balance,sparsity_first,performance_first}.yaml)
and `make repeat`, which runs one of them over N seeds and tabulates mean, sd and 95 % CI."""

import csv
import json
import shlex
import shutil
import statistics
import sys

import pytest
from hydra.utils import instantiate

from sparse_merge.analysis import merge_table
from sparse_merge.evolution.scoring import SparsityAwareScorer

from .conftest import compose_cfg, launch_run_py, make_dry_run

# preset -> (omega, beta, pruning target, tau) as the use cases promise them (balance: no tau)
PRESETS = {
    "balance": (0.5, 0.5, 0.5, 0.1),
    "sparsity_first": (0.2, 0.8, 0.7, 0.5),
    "performance_first": (0.8, 0.2, 0.3, 2.0),
}


@pytest.mark.parametrize(("preset", "promised"), PRESETS.items())
def test_preset_composes_with_the_promised_settings(preset, promised, tmp_path):
    cfg = compose_cfg([f"experiment={preset}"], tmp_path)
    omega, beta, sparsity, tau = promised
    assert (cfg.scorer.omega, cfg.scorer.beta, cfg.sparsity, cfg.scorer.tau) == promised
    scorer = instantiate(cfg.scorer)
    assert isinstance(scorer, SparsityAwareScorer)
    assert (scorer.omega, scorer.beta, scorer.tau) == (omega, beta, tau)
    # the pruning schedule tops out at the target and the picks are pruned to it at the end
    assert cfg.evolver.schedule.high is None and cfg.evolver.final_prune
    assert cfg.pipeline == "merge" and cfg.evolver.iterations == 60  # the default run otherwise


# the smoke experiment's model and task splits, and the smallest search (passed as ARGS)
TINY = [
    "model.name=toy-llama-smoke",
    "model.arch.hidden_size=32",
    "model.arch.intermediate_size=64",
    "model.arch.num_attention_heads=4",
    "model.arch.num_key_value_heads=2",
    "model.base_steps=30",
    "model.child_steps=20",
    "model.batch_size=16",
    "task=toy_smoke",
    "evolver.pop_size=4",
    "evolver.iterations=4",
    "evolver.schedule.period=2",
    "hydra.sweep.subdir=${hydra.job.num}",
    "hydra/job_logging=none",
    "hydra/hydra_logging=none",
]


def _after(line: str, marker: str) -> list[str]:
    words = shlex.split(line)
    return words[words.index(marker) + 1 :]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_repeat_target_tabulates_mean_sd_and_ci_over_n_seeds(tmp_path, capsys, monkeypatch):
    """`make repeat EXP=balance N=2`: the commands it runs (read with `make -n`), run here on the
    smoke model: two seeds, then one table with a 95 % CI column after every value column."""
    sweep = tmp_path / "sweep"
    args = [*TINY, f"model.cache_dir={tmp_path.parent / 'model_cache'}"]
    # make expands `$`: `$$` passes `${hydra.job.num}` through to Hydra
    launch, analysis = make_dry_run(
        "repeat",
        "EXP=balance",
        "N=2",
        f"REPEAT_DIR={sweep}",
        "ARGS=" + shlex.join(args).replace("$", "$$"),
    )
    assert "sparse_merge.analysis.merge_table" in analysis
    argv = _after(launch, "run.py")
    assert {"experiment=balance", "seed=range(0,2)", "baselines=classic"} <= set(argv)
    launch_run_py(argv)
    monkeypatch.setattr(sys, "argv", ["merge_table", *_after(analysis, "-m")[1:]])
    merge_table.main()
    printed = capsys.readouterr().out
    assert "2 seed(s)" in printed and "95% CI of the mean, Student t, n-1 dof" in printed

    results = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
    assert len(results) == 2
    with open(sweep / "merge_table.csv") as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    assert {"base", "task_arithmetic", "ties", "dare_ties", "best", "sparse"} <= set(rows)
    t = merge_table.t_quantile(0.975, 1)
    for model, row in rows.items():
        per_seed = [next(m for m in r["models"] if m["model"] == model) for r in results]
        for col in ("addition", "reversal", "mean", "sparsity"):
            values = [m[col] for m in per_seed]
            mean, sd = statistics.fmean(values), statistics.stdev(values)
            assert row[col] == f"{mean:.3f} ± {sd:.3f}"
            half = t * sd / 2**0.5
            assert row[f"{col} 95% CI"] == f"[{mean - half:.3f}, {mean + half:.3f}]"
        assert row["seeds"] == "2"
    for pick in ("best", "sparse"):  # the picks are pruned to the preset's target
        assert rows[pick]["sparsity"] == "0.500 ± 0.000"
