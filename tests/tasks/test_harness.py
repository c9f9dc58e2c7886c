"""The lm-evaluation-harness adapter, on a local task definition (no download)."""

from __future__ import annotations

import pytest
import torch

from sparse_merge.errors import ConfigError
from sparse_merge.tasks.boolq import BoolQ

from .conftest import FIXTURES

pytest.importorskip("lm_eval")

from sparse_merge.tasks.harness import LMEvalSuite  # noqa: E402

TASK_YAML = """task: boolq_local
dataset_path: parquet
dataset_kwargs:
  data_files:
    train: {train}
    validation: {validation}
output_type: multiple_choice
training_split: train
validation_split: validation
doc_to_text: "{{{{passage}}}}\\nQuestion: {{{{question}}}}?\\nAnswer:"
doc_to_target: "{{{{answer | int}}}}"
doc_to_choice: ["no", "yes"]
metric_list:
  - metric: acc
"""


@pytest.fixture
def include_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    tasks = tmp_path / "lm_eval_tasks"
    tasks.mkdir()
    (tasks / "boolq_local.yaml").write_text(
        TASK_YAML.format(
            train=FIXTURES / "boolq_train.parquet", validation=FIXTURES / "boolq_validation.parquet"
        )
    )
    return str(tasks)


def test_per_document_scores_match_our_boolq(include_path, tiny_llama, tokenizer):
    suite = LMEvalSuite(
        ["boolq_local"], include_path, False, n_select=1, n_heldout=3, num_fewshot=0
    )
    bench = suite.tasks["boolq_local"]
    held, sel = bench.heldout.doc_ids, bench.selection.doc_ids
    assert len(held) == 3 and len(sel) == 1 and not set(held) & set(sel)
    ours = BoolQ(
        data_files={
            "train": str(FIXTURES / "boolq_train.parquet"),
            "validation": str(FIXTURES / "boolq_validation.parquet"),
        },
        n_heldout=None,
        n_select=0,
    ).heldout
    expected = ours.score(tiny_llama, tokenizer).float()[held]  # the same documents, our scorer
    got = bench.heldout.score(tiny_llama, tokenizer)
    assert got.shape == (3,) and torch.equal(got, expected)
    assert suite.score_selection(tiny_llama, tokenizer).shape == (1,)


def test_training_examples_from_the_training_documents(include_path):
    bench = LMEvalSuite(["boolq_local"], include_path, False, n_select=1, n_heldout=1).tasks[
        "boolq_local"
    ]
    examples = bench.train_examples(6, seed=0)
    assert {e.answer for e in examples} <= {" no", " yes"} and len(
        {e.prompt for e in examples}
    ) == 6
    assert all(e.prompt.endswith("?\nAnswer:") for e in examples)


def test_bad_values(include_path):
    with pytest.raises(ConfigError, match="tasks"):
        LMEvalSuite("boolq")
    bench = LMEvalSuite(["boolq_local"], include_path, False, n_select=2, n_heldout=3).tasks[
        "boolq_local"
    ]
    with pytest.raises(ConfigError, match="n_select=2"):
        _ = bench.selection


def test_few_shot_prompts_are_the_same_in_every_evaluation(
    include_path, tiny_llama, tokenizer, monkeypatch
):
    """lm-eval's sampler advances its one Random with every evaluation: reseeded before each,
    a document's prompt (its exemplars) does not depend on what was evaluated before."""
    import lm_eval.evaluator

    prompts = []
    evaluate = lm_eval.evaluator.evaluate

    def recording(*args, **kwargs):
        results = evaluate(*args, **kwargs)
        samples = results["samples"]["boolq_local"]
        prompts.append({s["doc_id"]: s["arguments"][0][0] for s in samples})
        return results

    monkeypatch.setattr(lm_eval.evaluator, "evaluate", recording)
    suite = LMEvalSuite(
        ["boolq_local"], include_path, False, n_select=1, n_heldout=2, num_fewshot=2
    )
    bench = suite.tasks["boolq_local"]
    bench.heldout.score(tiny_llama, tokenizer)
    bench.selection.score(tiny_llama, tokenizer)
    bench.heldout.score(tiny_llama, tokenizer)
    assert prompts[0] == prompts[2] and len(prompts[0]) == 2
    assert all(p.count("Answer:") == 3 for p in prompts[0].values())  # two exemplars each
