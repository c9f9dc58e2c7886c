"""Run directories: named by experiment, never shared by two runs, read only when consistent.

A run refuses a directory holding another run's files (``run_identity.json`` of another config,
or finished results and no ``resume=true``); the digits pipeline, which keeps one file per job
with its settings, continues its own directory; the analysis leaves out a directory whose
``.hydra/`` (rewritten by Hydra for every job launched into it) is not the run its results are
of.
"""

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

import sparse_merge.app as app
from sparse_merge.analysis.collect import collect, find_runs, finished_results, load_run
from sparse_merge.app import _job_dirname, execute, register_resolvers, run
from sparse_merge.errors import ConfigError
from sparse_merge.tracking.run_identity import (
    IDENTITY_FILE,
    RunDirTaken,
    RunIdentity,
    claim_run_dir,
    config_digest,
)

from .conftest import DIGITS, ROOT, SUBPROCESS_ENV, compose_cfg

# ----------------------------------------------------------------------------- directory names


def test_job_directories_are_named_by_time_and_experiment():
    register_resolvers()
    cfg = compose_cfg(["experiment=smoke", "seed=1", "resume=true"])
    assert re.fullmatch(r"outputs/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d_smoke", cfg.hydra.run.dir)
    assert re.fullmatch(r"multirun/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d_smoke", cfg.hydra.sweep.dir)
    # the sweep job's folder: the experiment among its overrides, resume not (a resumed sweep
    # finds its jobs' folders)
    assert cfg.hydra.job.override_dirname == "experiment=smoke,seed=1"
    other = compose_cfg(["experiment=finetune_smoke"])  # launched in the same second
    assert (
        other.hydra.run.dir.endswith("_finetune_smoke") and other.hydra.run.dir != cfg.hydra.run.dir
    )
    plain = compose_cfg(["seed=1"])
    assert re.fullmatch(r"outputs/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d", plain.hydra.run.dir)
    assert re.fullmatch(r"multirun/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d", plain.hydra.sweep.dir)


def test_a_job_folder_name_longer_than_a_file_name_may_be_is_shortened_stably():
    short = "experiment=smoke,seed=1"
    assert _job_dirname(3, short) == f"3_{short}"  # names that fit are as they always were
    long = ",".join(f"model.base_skills.task_{i}.max_digits={i}" for i in range(12))
    name = _job_dirname(0, long)
    assert len(name.encode()) <= 255 and name.startswith("0_model.base_skills.task_0")
    assert name == _job_dirname(0, long) != _job_dirname(0, long + "1") != _job_dirname(1, long)


def test_a_sweep_whose_job_names_are_long_runs(tmp_path):
    """``experiments/row_sparse/run.sh``'s sweeps named their jobs by 12 overrides (258 bytes):
    the OS refused the folder and the sweep ended at its first job."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", "experiment=smoke", "evolver.iterations=1"]
    cmd += ["evolver.pop_size=2", "save_models=false", "hardware.num_threads=1"]
    cmd += ["scorer.beta=1.0", "scorer.omega=1.0", "sparsity=0.0", "seed=0,1"]
    cmd += ["model.base_steps=30", "model.child_steps=20", "calibration.n=8"]
    cmd += ["evolver.checkpoint_every=1", "evolver.matchmaker=true", "evolver.mutation_std=0.0"]
    cmd += [f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(
        cmd, env=SUBPROCESS_ENV, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = sorted(p.parent.parent.name for p in sweep.glob("*/.hydra/config.yaml"))
    assert len(jobs) == 2 and all(len(j.encode()) <= 255 for j in jobs)  # were 285 bytes
    assert set(collect(sweep)["status"]) == {"finished"}


# ----------------------------------------------------------------------- claim_run_dir's rules

MERGE = RunIdentity("merge", "smoke", {"pipeline": "merge", "seed": 0, "resume": False})


def _status(run_dir: Path, state: str) -> None:
    (run_dir / "status.json").write_text(json.dumps({"status": state}))


def test_a_fresh_folder_is_claimed_and_records_the_run(tmp_path):
    claim_run_dir(tmp_path / "run", MERGE, continues=False)
    held = json.loads((tmp_path / "run" / IDENTITY_FILE).read_text())
    assert held | {"claimed": 0} == {
        "pipeline": "merge",
        "experiment": "smoke",
        "config_sha256": config_digest({"pipeline": "merge", "seed": 0}),
        "claimed": 0,
        "config": {"pipeline": "merge", "seed": 0},  # resume and output_dir left out
        "overrides": [],
        "choices": {},
    }
    claim_run_dir(tmp_path / "other", MERGE, continues=False, write=False)
    assert not (tmp_path / "other").exists()  # a non-main process only checks


def test_the_same_run_restarts_in_its_folder_until_it_finished(tmp_path):
    run_dir = tmp_path / "run"
    claim_run_dir(run_dir, MERGE, continues=False)
    for state in ("running", "failed"):  # killed, or failed: the same run may start again
        _status(run_dir, state)
        claim_run_dir(run_dir, MERGE, continues=False)
    _status(run_dir, "finished")
    with pytest.raises(RunDirTaken) as err:
        claim_run_dir(run_dir, MERGE, continues=False)
    message = str(err.value)
    assert "\n" not in message and str(run_dir) in message
    assert "the finished results of this same run (pipeline=merge, experiment=smoke)" in message
    assert "resume=true" in message and "hydra.sweep.dir" in message
    claim_run_dir(run_dir, MERGE, continues=True)  # resume=true continues it


@pytest.mark.parametrize("state", ["running", "failed", "finished"])
def test_another_runs_folder_is_refused(tmp_path, state):
    run_dir = tmp_path / "run"
    claim_run_dir(run_dir, MERGE, continues=False)
    _status(run_dir, state)
    before = (run_dir / IDENTITY_FILE).read_text()
    other = RunIdentity("finetune", "finetune_smoke", {"pipeline": "finetune", "seed": 0})
    with pytest.raises(RunDirTaken) as err:
        claim_run_dir(run_dir, other, continues=False)
    expected = {
        "running": "the files of another run (pipeline=merge, experiment=smoke, other settings, "
        "status running)",
        "failed": "the files of another run (pipeline=merge, experiment=smoke, other settings, "
        "status failed)",
        "finished": "the finished results of another run (pipeline=merge, experiment=smoke, "
        "other settings)",
    }[state]
    assert f"it holds {expected}; pass resume=true to continue that run" in str(err.value)
    with pytest.raises(RunDirTaken, match="continues only a run of its own pipeline"):
        claim_run_dir(run_dir, other, continues=True)  # resume=true cannot adopt it either
    assert (run_dir / IDENTITY_FILE).read_text() == before


def test_a_run_continues_its_own_kind_with_other_settings(tmp_path):
    run_dir = tmp_path / "run"
    claim_run_dir(run_dir, MERGE, continues=False)
    _status(run_dir, "finished")
    more = RunIdentity("merge", "smoke", {"pipeline": "merge", "seed": 1})  # e.g. more steps
    with pytest.raises(RunDirTaken, match="other settings"):
        claim_run_dir(run_dir, more, continues=False)
    claim_run_dir(run_dir, more, continues=True)  # the pipeline checks its checkpoint's settings
    assert json.loads((run_dir / IDENTITY_FILE).read_text())["config"]["seed"] == 1
    with pytest.raises(RunDirTaken, match="experiment=smoke"):
        claim_run_dir(run_dir, RunIdentity("merge", None, more.config), continues=True)


def test_results_without_an_identity_are_refused_unless_continued(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text("{}")  # results alone (no status): not a run's claim
    claim_run_dir(run_dir, MERGE, continues=False)
    (run_dir / IDENTITY_FILE).unlink()
    _status(run_dir, "finished")  # a run from before identities were recorded
    with pytest.raises(RunDirTaken, match="a run that recorded no identity"):
        claim_run_dir(run_dir, MERGE, continues=False)
    claim_run_dir(run_dir, MERGE, continues=True)


def test_the_digest_leaves_out_how_and_where_a_run_goes():
    base = {"pipeline": "merge", "seed": 0, "resume": False, "output_dir": "a"}
    same = {**base, "resume": True, "output_dir": "b", "hydra": {"x": 1}}
    assert config_digest(base) == config_digest(same)
    assert config_digest(base) != config_digest({**base, "seed": 1})


# --------------------------------------------------------------------------- through run(cfg)


@pytest.fixture
def quick_pipelines(monkeypatch):
    """Pipelines that write a summary at once (what a pipeline run leaves, in milliseconds)."""

    def pipeline(name):
        def go(cfg, parts, run_dir):
            metrics = {"merge": {"merged/mean": 0.5}, "finetune": {"loss": 1.5}}[name]
            (Path(run_dir) / "summary.json").write_text(json.dumps(metrics))
            return 0.25

        return go

    monkeypatch.setattr(app, "_pipeline", pipeline)


def test_a_finetune_run_refuses_a_merge_runs_folder_with_one_line(
    quick_pipelines, tmp_path, capsys
):
    execute(compose_cfg(["experiment=smoke"], tmp_path))
    run_dir = tmp_path / "run"
    kept = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    with pytest.raises(SystemExit) as exit_:
        run(compose_cfg(["experiment=finetune_smoke"], tmp_path))
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: output_dir='{run_dir}' is not allowed: it holds the ")
    assert "finished results of another run (pipeline=merge, experiment=smoke" in lines[0]
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == kept


def test_a_finished_run_again_needs_resume(quick_pipelines, tmp_path):
    execute(compose_cfg(["experiment=smoke"], tmp_path))
    with pytest.raises(ConfigError, match="finished results of this same run"):
        execute(compose_cfg(["experiment=smoke"], tmp_path))
    assert execute(compose_cfg(["experiment=smoke", "resume=true"], tmp_path)) == 0.25
    with pytest.raises(ConfigError, match="continues only a run of its own pipeline"):
        execute(compose_cfg(["experiment=finetune_smoke", "resume=true"], tmp_path))


def test_digits_continues_its_own_folder_and_refuses_another_kind(tmp_path):
    """The digits comparison lays out one file per (panel, method, seed) with its settings and
    reruns only the jobs whose settings changed: a rerun in its folder, with other settings
    too, continues it (tests/test_digits_experiment.py reruns the quick experiment so)."""
    execute(compose_cfg([*DIGITS, "budget=20"], tmp_path))
    execute(compose_cfg([*DIGITS, "budget=30"], tmp_path))  # no resume=true needed
    runs = tmp_path / "run" / "runs"
    assert json.loads((runs / "scratch__mapelites__seed0.json").read_text())["evals"] == 30
    with pytest.raises(ConfigError, match="continues only a run of its own pipeline and experi"):
        execute(compose_cfg(["experiment=m2n2_digits_quick"], tmp_path))
    with pytest.raises(ConfigError, match="another run \\(pipeline=digits, experiment=none"):
        execute(compose_cfg(["experiment=smoke"], tmp_path))


# ------------------------------------------------------------------------------ the analysis


def _job(root: Path, name: str, cfg: dict, identity_of: dict | None, metrics: dict) -> Path:
    """A job folder as Hydra and the app leave it: ``.hydra/`` of ``cfg``, the identity of the
    run whose results are there (``identity_of``'s config), its status and summary."""
    run_dir = root / name
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(cfg), run_dir / ".hydra" / "config.yaml")
    choices = {"experiment": None}
    OmegaConf.save({"hydra": {"runtime": {"choices": choices}}}, run_dir / ".hydra" / "hydra.yaml")
    if identity_of is not None:  # as identities were recorded before they held the overrides
        held = RunIdentity(identity_of["pipeline"], None, identity_of).record()
        del held["overrides"], held["choices"]
        (run_dir / IDENTITY_FILE).write_text(json.dumps(held))
    (run_dir / "status.json").write_text(json.dumps({"status": "finished"}))
    (run_dir / "results.json").write_text(json.dumps(metrics))
    (run_dir / "summary.json").write_text(json.dumps(metrics))
    return run_dir


def test_the_analysis_leaves_out_a_folder_of_two_runs(tmp_path, caplog):
    merge = {"pipeline": "merge", "seed": 0, "sparsity": 0.5}
    finetune = {"pipeline": "finetune", "seed": 0, "sparsity": 0.5}
    good = _job(tmp_path, "0_seed=0", merge, merge, {"merged/mean": 0.5})
    mixed = _job(tmp_path, "1_seed=0", finetune, merge, {"merged/mean": 0.7})  # the old bug
    older = _job(tmp_path, "2_seed=0", finetune, None, {"loss": 1.0})  # no identity: as it is
    part = _job(tmp_path, "3_seed=0", {"seed": 0}, merge, {"merged/mean": 0.6})  # agrees
    with caplog.at_level(logging.WARNING, logger="sparse_merge"):
        assert find_runs(tmp_path) == [good, older, part]
    assert caplog.text.count("left out") == 1 and f"left out {mixed}: " in caplog.text
    assert "its results are of a run of pipeline=merge, experiment=none" in caplog.text
    assert "holds another run's config, launched into the folder later: " in caplog.text
    assert "pipeline='finetune' (results: 'merge')" in caplog.text
    table = collect(tmp_path)
    assert list(table["run"]) == ["0_seed=0", "2_seed=0", "3_seed=0"]
    assert list(table["pipeline"])[:2] == ["merge", "finetune"]
    assert table.loc[0, "metric/merged/mean"] == 0.5
    runs = [info["run"] for info, _ in finished_results(tmp_path)]
    assert runs == ["0_seed=0", "2_seed=0", "3_seed=0"]


OLD_NAMES = "hydra.job.config.override_dirname.exclude_keys=[experiment,resume,hydra.launcher]"


def _sweep(sweep_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """``run.py -m`` with the job folders named as they were: the experiment left out."""
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", *args, "hardware.num_threads=1", "seed=0"]
    cmd += [f"hydra.sweep.dir={sweep_dir}", OLD_NAMES]
    return subprocess.run(
        cmd, env=SUBPROCESS_ENV, cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_two_sweeps_into_one_folder_no_longer_mix(tmp_path, caplog):
    """The reported bug: a finetune sweep launched into another sweep's folder ran in its job
    folders (named without the experiment) and the analysis showed finetune rows with the other
    run's metrics. Now its job refuses with one line, the results there stay, and the analysis
    reads the folder as the run that wrote them (its identity), not as the refused job that
    Hydra's rewritten .hydra/ describes."""
    sweep = tmp_path / "sweep"
    first = _sweep(sweep, "experiment=m2n2_digits_quick")
    assert first.returncode == 0, first.stderr[-2000:]
    job = sweep / "0_hardware.num_threads=1,seed=0"
    assert find_runs(sweep) == [job]
    kept = {p.name: p.read_bytes() for p in job.iterdir() if p.is_file() and p.suffix != ".log"}
    second = _sweep(sweep, "experiment=finetune_smoke")
    assert second.returncode != 0
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
    assert errors[1] == "error: 1 job(s) of the sweep refused"  # after every job ran
    assert errors[0].startswith(f"error: output_dir='{job}' is not allowed: it holds the finis")
    assert "of another run (pipeline=digits, experiment=m2n2_digits_quick" in errors[0]
    assert {
        p.name: p.read_bytes() for p in job.iterdir() if p.is_file() and p.suffix != ".log"
    } == kept
    assert OmegaConf.load(job / ".hydra" / "config.yaml").pipeline == "finetune"  # Hydra's
    (row,) = collect(sweep).to_dict("records")  # no finetune row with the digits run's metrics
    assert row["pipeline"] == "digits" and row["experiment"] == "m2n2_digits_quick"
    assert row["status"] == "finished"


def test_a_real_runs_identity_matches_its_hydra_config(tmp_path):
    """What Hydra saves in .hydra/config.yaml and what the app digests are the same config."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "run.py"), *DIGITS, "budget=10", f"hydra.run.dir={out}"]
    proc = subprocess.run(
        cmd, env=SUBPROCESS_ENV, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    held = json.loads((out / IDENTITY_FILE).read_text())
    saved = OmegaConf.to_container(OmegaConf.load(out / ".hydra" / "config.yaml"))
    assert held["config_sha256"] == config_digest(saved) and held["pipeline"] == "digits"
    assert held["config"] == {k: v for k, v in saved.items() if k not in ("output_dir", "resume")}
    assert find_runs(tmp_path) == [out]


def test_resume_in_a_fresh_folder_starts_the_run(quick_pipelines, tmp_path):
    cfg = compose_cfg(["experiment=smoke"], tmp_path)
    with open_dict(cfg):
        cfg.resume = True
    assert execute(cfg) == 0.25
    assert json.loads((tmp_path / "run" / IDENTITY_FILE).read_text())["pipeline"] == "merge"


def test_a_refused_resume_leaves_the_finished_run_as_it_was(tmp_path):
    """``resume=true`` with a setting that shapes the result changed is refused by the pipeline
    after the folder was claimed: the identity and status it rewrote are put back, and the
    analysis still reads the finished run (with its own settings, not the refused launch's)."""
    execute(compose_cfg(["experiment=smoke", "save_models=false"], tmp_path))
    run_dir = tmp_path / "run"
    kept = {n: (run_dir / n).read_bytes() for n in (IDENTITY_FILE, "status.json", "results.json")}
    with pytest.raises(ConfigError, match="resume"):
        execute(
            compose_cfg(
                ["experiment=smoke", "save_models=false", "resume=true", "sparsity=0.3"], tmp_path
            )
        )
    assert {n: (run_dir / n).read_bytes() for n in kept} == kept
    info = load_run(run_dir, tmp_path)  # read from the identity (.hydra/ is Hydra's, not here)
    assert info["status"] == "finished" and info["sparsity"] == 0.5


def test_a_job_resumed_alone_stays_in_its_sweeps_group(tmp_path):
    """``resume=true`` and a value spelled otherwise (``False``, ``false``) do not split a group."""
    cfg = {"pipeline": "merge", "seed": 0, "sparsity": 0.5}
    for i, overrides in enumerate(
        [["seed=0", "save_models=False"], ["seed=1", "save_models=false", "resume=true"]]
    ):
        run_dir = tmp_path / str(i)
        (run_dir / ".hydra").mkdir(parents=True)
        OmegaConf.save(OmegaConf.create(cfg), run_dir / ".hydra" / "config.yaml")
        held = RunIdentity("merge", None, {**cfg, "seed": i}, tuple(overrides)).record()
        (run_dir / IDENTITY_FILE).write_text(json.dumps(held))
        (run_dir / "status.json").write_text(json.dumps({"status": "finished"}))
    table = collect(tmp_path)
    assert list(table["save_models"]) == ["False", "False"] and "resume" not in table
    assert list(table["seed"]) == [0, 1]  # from each run's identity, not .hydra/


def test_a_bad_value_in_one_sweep_job_ends_that_job_only(tmp_path):
    """A job's config error used to exit the process, which ended the whole sweep: the later
    jobs never ran and the failed one had no status. Now it is recorded as failed, with its
    line, and the next job runs."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", "experiment=smoke", "sparsity=1.5,0.3"]
    cmd += ["save_models=false", "hardware.num_threads=1", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(
        cmd, env=SUBPROCESS_ENV, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert "error: sparsity=1.5 is not allowed: a fraction in [0, 1)" in proc.stderr
    assert proc.returncode == 2 and "1 job(s) of the sweep refused" in proc.stderr
    rows = {r["sparsity"]: r for r in collect(sweep).to_dict("records")}
    assert rows[1.5]["status"] == "failed" and "sparsity=1.5" in rows[1.5]["error"]
    assert rows[0.3]["status"] == "finished"
