"""Bad data files fail with one line naming the file, the line (or row) and the field, before any
model loads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from sparse_merge.errors import DataError
from sparse_merge.tasks.bfcl import BFCL
from sparse_merge.tasks.data import read_rows
from sparse_merge.tasks.gsm8k import GSM8K
from sparse_merge.tasks.hellaswag import HellaSwag
from sparse_merge.tasks.mbpp import MBPP

from ..conftest import compose_cfg
from .conftest import FIXTURES


def write_lines(path: Path, lines: list) -> str:
    """JSON lines: dicts are dumped, strings written as they are."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def gsm8k_rows(n: int = 6) -> list[dict]:
    return [
        {"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}
        for i in range(n)
    ]


def load_gsm8k(files: str) -> None:
    bench = GSM8K(data_files=files, n_select=1, n_heldout=1, num_fewshot=0)
    len(bench.heldout), len(bench.selection)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_malformed_jsonl_names_the_file_and_the_line(tmp_path):
    lines = [json.dumps(r) for r in gsm8k_rows()]
    lines.insert(3, '{"question": "broken", "answer": ')  # line 4
    path = write_lines(tmp_path / "train.jsonl", lines)
    with pytest.raises(DataError) as err:
        load_gsm8k(path)
    assert re.match(re.escape(f"{path}:4: not valid JSON ("), one_line(err))
    with pytest.raises(DataError, match=re.escape(f"{path}:4: not valid JSON")):
        read_rows(path)


def test_malformed_json_document_names_its_line(tmp_path):
    text = json.dumps(gsm8k_rows(3), indent=2).splitlines()
    text[2] = text[2].rstrip(",")  # a missing comma after line 3: line 4 is where it breaks
    path = tmp_path / "rows.json"
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:4: not valid JSON")):
        read_rows(path)


def test_missing_field_names_file_line_field_and_the_expected_fields(tmp_path):
    rows = gsm8k_rows()
    rows[1] = {"question": "Where is the answer?", "solution": "#### 3"}  # line 2
    path = write_lines(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_gsm8k(path)
    message = one_line(err)
    assert message.startswith(f"{path}:2: no field 'answer'")
    assert "question, answer" in message and "solution" in message  # expected, and what it has
    assert err.value.where == f"{path}:2" and "gsm8k.data_files" in message


def test_mbpp_row_without_test_list(tmp_path):
    rows = [json.loads(x) for x in (FIXTURES / "mbpp.jsonl").read_text().splitlines()]
    del rows[4]["test_list"]
    path = write_lines(tmp_path / "mbpp.jsonl", rows)
    with pytest.raises(DataError) as err:
        len(MBPP(data_files=path, n_select=2, n_heldout=2, num_fewshot=0).heldout)
    message = one_line(err)
    assert message.startswith(f"{path}:5: no field 'test_list'")
    assert "text|prompt, code, test_list" in message


@pytest.mark.parametrize("line, kind", [("[1, 2]", "list"), ('"text"', "str"), ("3", "int")])
def test_jsonl_of_non_objects(tmp_path, line, kind):
    lines = [json.dumps(r) for r in gsm8k_rows()]
    lines[2] = line
    path = write_lines(tmp_path / "train.jsonl", lines)
    with pytest.raises(DataError) as err:
        load_gsm8k(path)
    assert one_line(err).startswith(f"{path}:3: expected a JSON object, got {kind}")


@pytest.mark.parametrize("document", ['"just text"', "[1, 2, 3]", '{"data": ["a", "b"]}'])
def test_json_document_of_non_objects(tmp_path, document):
    path = tmp_path / "rows.json"
    path.write_text(document)
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*expected a JSON object"):
        read_rows(path)


def test_gsm8k_answer_without_final_number_is_refused(tmp_path):
    rows = gsm8k_rows()
    rows[2] = {"question": "What is 2 + 2?", "answer": "2 + 2 = 4, so the answer is 4"}
    path = write_lines(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_gsm8k(path)
    message = one_line(err)
    assert message.startswith(f"{path}:3: field 'answer' has no final '#### <number>'")


def test_mbpp_test_list_as_a_string_is_refused(tmp_path):
    rows = [json.loads(x) for x in (FIXTURES / "mbpp.jsonl").read_text().splitlines()]
    rows[0]["test_list"] = "assert f(1) == 2"
    path = write_lines(tmp_path / "mbpp.jsonl", rows)
    with pytest.raises(DataError) as err:
        len(MBPP(data_files=path, n_select=2, n_heldout=2, num_fewshot=0).heldout)
    message = one_line(err)
    assert message.startswith(f"{path}:1: field 'test_list' must be a list of strings, got str")


def test_mbpp_test_list_from_parquet_loads(tmp_path):
    """Parquet gives list columns as numpy arrays: those are lists of strings too."""
    rows = [json.loads(x) for x in (FIXTURES / "mbpp.jsonl").read_text().splitlines()]
    path = tmp_path / "mbpp.parquet"
    pd.DataFrame(rows).to_parquet(path)
    task = MBPP(data_files=str(path), n_select=2, n_heldout=2, num_fewshot=0).heldout
    assert all(r["test_list"][0].startswith("assert") for r in task.rows)


def test_csv_and_parquet_rows_are_located_by_row_number(tmp_path):
    rows = gsm8k_rows()
    rows[3]["answer"] = "no final number here"
    path = tmp_path / "train.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    with pytest.raises(DataError, match=re.escape(f"{path} row 4: field 'answer'")):
        load_gsm8k(str(path))


def test_hellaswag_row_without_endings_and_with_a_bad_label(tmp_path):
    rows = [json.loads(x) for x in (FIXTURES / "hellaswag.jsonl").read_text().splitlines()]
    del rows[6]["endings"]
    path = write_lines(tmp_path / "hs.jsonl", rows)
    with pytest.raises(DataError, match=re.escape(f"{path}:7: no field 'endings'")):
        len(HellaSwag(data_files=path, n_select=2, n_heldout=2).heldout)
    rows = [json.loads(x) for x in (FIXTURES / "hellaswag.jsonl").read_text().splitlines()]
    rows[1]["label"] = "7"
    path = write_lines(tmp_path / "hs2.jsonl", rows)
    with pytest.raises(DataError, match=re.escape(f"{path}:2: field 'label'")):
        len(HellaSwag(data_files=path, n_select=2, n_heldout=2).heldout)


def test_bfcl_rows_without_function_or_ground_truth(tmp_path):
    questions = [json.loads(x) for x in (FIXTURES / "bfcl_simple.json").read_text().splitlines()]
    answers = FIXTURES / "bfcl_simple_answers.json"
    del questions[2]["function"]
    q = write_lines(tmp_path / "q.json", questions)
    with pytest.raises(DataError) as err:
        len(BFCL(questions=q, answers=str(answers), n_select=2, n_heldout=2).heldout)
    message = one_line(err)
    assert message.startswith(f"{q}:3: no field 'function'") and "bfcl.questions" in message
    lines = [json.loads(x) for x in answers.read_text().splitlines()]
    lines[5] = {"id": lines[5]["id"], "answer": []}
    a = write_lines(tmp_path / "a.json", lines)
    with pytest.raises(DataError, match=re.escape(f"{a}:6: no field 'ground_truth'")):
        len(BFCL(questions=str(FIXTURES / "bfcl_simple.json"), answers=a, n_select=2).heldout)


def test_good_fixtures_still_load():
    load_gsm8k(str(FIXTURES / "gsm8k_train.jsonl"))
    assert len(read_rows(FIXTURES / "bfcl_simple.json")) == 8


def test_bad_data_fails_in_the_pipeline_before_any_model_loads(tmp_path, tokenizer, monkeypatch):
    """``pipeline=evaluate`` with a bad GSM8K file: the data error, and no model loaded."""
    from sparse_merge.app import execute
    from sparse_merge.pipelines import evaluate

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(evaluate, "load_causal_lm", no_model)
    tokenizer.save_pretrained(tmp_path / "tok")
    rows = gsm8k_rows()
    rows[4] = {"question": "What is 9 + 1?"}
    path = write_lines(tmp_path / "train.jsonl", rows)
    cfg = compose_cfg(
        [
            "pipeline=evaluate",
            "model=hf",
            f"model.base={tmp_path / 'tok'}",
            "task=gsm8k",
            f"task.tasks.gsm8k.data_files={path}",
            "task.tasks.gsm8k.n_select=1",
            "task.tasks.gsm8k.n_heldout=1",
            "task.tasks.gsm8k.num_fewshot=0",
        ],
        tmp_path,
    )
    with pytest.raises(DataError, match=re.escape(f"{path}:5: no field 'answer'")):
        execute(cfg)
