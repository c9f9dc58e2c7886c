"""The per-layer sparsity heatmap (layer x step) of runs that logged ``layer_sparsity``."""

import json
import subprocess
import sys

import yaml

from sparse_merge.analysis.__main__ import analyze
from sparse_merge.analysis.plots import layer_sparsity_heatmap, layer_sparsity_table

PNG = b"\x89PNG\r\n\x1a\n"
LAYERS = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.experts.weight[0]"]


def write_run(run_dir, steps=None):
    """A run folder as Hydra and the engine leave it; ``steps``: layer values per step."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(
        yaml.safe_dump({"seed": 0, "sparsity": 0.5, "pipeline": "merge"})
    )
    (run_dir / "status.json").write_text(json.dumps({"status": "finished"}))
    (run_dir / "summary.json").write_text(json.dumps({"accuracy": 0.5, "sparsity": 0.5}))
    lines = [{"event": "initial", "id": 0, "sparsity": 0.0}]
    for step, values in enumerate(steps or []):
        rec = {"event": "step", "step": step, "child_sparsity": 0.1, "child_scores": [1.0]}
        if values is not None:
            rec["layer_sparsity"] = dict(zip(LAYERS, values))
        lines.append(rec)
    (run_dir / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_table_is_layers_by_steps_and_a_step_logged_again_counts_once(tmp_path):
    write_run(tmp_path, [[0.0, 0.5], [0.25, 1.0], [0.5, 0.75]])
    with open(tmp_path / "log.jsonl", "a") as f:  # a resumed run logs step 1 again
        f.write(
            json.dumps(
                {"event": "step", "step": 1, "layer_sparsity": dict(zip(LAYERS, [0.3, 0.9]))}
            )
            + "\n"
        )
    table = layer_sparsity_table(tmp_path / "log.jsonl")
    assert list(table.index) == LAYERS and list(table.columns) == [0, 1, 2]
    assert table.to_numpy().tolist() == [[0.0, 0.3, 0.5], [0.5, 0.9, 0.75]]


def test_heatmap_png_is_written_and_nothing_without_records(tmp_path):
    write_run(tmp_path / "a", [[0.1, 0.2]] * 30)
    out = layer_sparsity_heatmap(tmp_path / "a" / "log.jsonl", tmp_path / "a.png", "a")
    assert out == tmp_path / "a.png" and out.read_bytes()[:8] == PNG
    write_run(tmp_path / "b", [None, None])  # the knob off: no per-layer records
    assert layer_sparsity_heatmap(tmp_path / "b" / "log.jsonl", tmp_path / "b.png") is None
    assert not (tmp_path / "b.png").exists()


def test_analysis_of_a_run_writes_its_heatmap(tmp_path):
    run = tmp_path / "run"
    write_run(run, [[0.0, 0.5], [0.5, 0.5]])
    written = analyze(run)
    assert written["layer_sparsity"] == run / "analysis" / "layer_sparsity.png"
    assert written["layer_sparsity"].read_bytes()[:8] == PNG


def test_analysis_of_a_sweep_writes_one_heatmap_per_run_that_logged_layers(tmp_path):
    write_run(tmp_path / "0_seed=0", [[0.0, 0.5], [0.5, 0.5]])
    write_run(tmp_path / "1_seed=1", [None])
    proc = subprocess.run(
        [sys.executable, "-m", "sparse_merge.analysis", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "analysis" / "layer_sparsity_0_seed=0.png").read_bytes()[:8] == PNG
    assert not (tmp_path / "analysis" / "layer_sparsity_1_seed=1.png").exists()
    assert "layer_sparsity_0_seed=0" in proc.stdout


def test_a_run_folder_named_up_to_a_file_names_length_gets_its_heatmap(tmp_path):
    """A sweep job folder named by many overrides is up to 255 bytes long (cut and hashed by
    ``${sm.dirname:...}``): its heatmap's name, 19 bytes longer, is cut and hashed alike (the
    analysis ended in OSError: File name too long)."""
    long_a = "0_" + "evolver.log_layer_sparsity=True," * 7 + "x" * 29
    long_b = long_a[:-1] + "y"  # same first bytes: the hash keeps the two files apart
    assert len(long_a.encode()) == len(long_b.encode()) == 255
    write_run(tmp_path / long_a, [[0.0, 0.5], [0.5, 0.5]])
    write_run(tmp_path / long_b, [[0.0, 0.5], [0.5, 0.5]])
    written = analyze(tmp_path)
    pngs = [written[f"layer_sparsity_{name}"] for name in (long_a, long_b)]
    assert pngs[0] != pngs[1]
    for png in pngs:
        assert len(png.name.encode()) <= 255 and png.read_bytes()[:8] == PNG
