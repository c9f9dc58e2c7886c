"""Loading rows from local files and drawing fixed, disjoint subsets."""

from __future__ import annotations

import gzip
import json

import pandas as pd
import pytest

from sparse_merge.errors import ConfigError, DataError
from sparse_merge.tasks.data import check_data_files, choose, load_split, read_rows
from sparse_merge.tasks.gsm8k import GSM8K

from .conftest import FIXTURES

ROWS = [{"q": f"question {i}", "a": i} for i in range(10)]


@pytest.mark.parametrize("fmt", ["json", "json_data", "jsonl", "json_lines", "parquet", "csv"])
def test_read_rows_in_every_format(fmt, tmp_path):
    path = tmp_path / f"rows.{fmt.split('_')[0]}"
    if fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt == "json_data":
        path.write_text(json.dumps({"data": ROWS}))
    elif fmt in ("jsonl", "json_lines"):  # BFCL ships JSON lines named .json
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "\n")
    else:
        getattr(pd.DataFrame(ROWS), f"to_{fmt}")(path, index=False)
    assert read_rows(path) == ROWS


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "txt"])
def test_read_gzipped_text_formats(fmt, tmp_path):
    plain = tmp_path / f"rows.{fmt}"
    if fmt == "json":
        plain.write_text(json.dumps(ROWS))
    elif fmt == "jsonl":
        plain.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "csv":
        pd.DataFrame(ROWS).to_csv(plain, index=False)
    else:
        plain.write_text("one text\n")
    packed = tmp_path / f"rows.{fmt}.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    check_data_files("data_files", str(packed))
    assert read_rows(packed) == read_rows(plain)


def test_bad_gzip_files_are_refused(tmp_path):
    for name in ("rows.parquet.gz", "rows.gz", "rows.xml.gz"):
        (tmp_path / name).write_bytes(gzip.compress(b"x"))
        with pytest.raises(ConfigError, match="a file ending in"):
            check_data_files("data_files", str(tmp_path / name))
    fake = tmp_path / "rows.jsonl.gz"
    fake.write_text('{"q": 1}\n')  # not compressed
    with pytest.raises(DataError, match="rows.jsonl.gz: not a readable gzip file"):
        read_rows(fake)


def test_load_split_from_a_mapping_or_one_pool():
    files = {
        "train": str(FIXTURES / "gsm8k_train.jsonl"),
        "test": str(FIXTURES / "gsm8k_test.jsonl"),
    }
    assert len(load_split("train", files)) == 8 and len(load_split("test", files)) == 4
    assert len(load_split("anything", str(FIXTURES / "gsm8k_test.jsonl"))) == 4
    with pytest.raises(ConfigError, match="split 'validation'"):
        load_split("validation", files)


def test_bad_data_files_fail_at_construction(tmp_path):
    with pytest.raises(ConfigError, match="an existing file"):
        GSM8K(data_files=str(tmp_path / "missing.jsonl"))
    (tmp_path / "rows.xml").write_text("x")
    with pytest.raises(ConfigError, match="a file ending in"):
        check_data_files("data_files", {"train": str(tmp_path / "rows.xml")})
    with pytest.raises(ConfigError, match="n_select"):
        GSM8K(data_files=str(FIXTURES / "gsm8k_test.jsonl"), n_select=-1)


def test_hub_without_network_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="set gsm8k.data_files to local files"):
        load_split("test", None, "sparse-merge-no-such/dataset", None, key="gsm8k.data_files")


def test_choose_is_seeded_ordered_and_excludes():
    key = lambda r: r["q"]  # noqa: E731
    a = choose(ROWS, 4, "s", set(), key)
    assert (
        a == choose(ROWS, 4, "s", set(), key)
        and a == sorted(a)
        and a != choose(ROWS, 4, "t", set(), key)
    )
    excluded = {ROWS[i]["q"] for i in a}
    b = choose(ROWS, 6, "s", excluded, key)
    assert not set(a) & set(b) and len(b) == 6
    with pytest.raises(ValueError, match="7 rows asked for, 6 available"):
        choose(ROWS, 7, "s", excluded, key)
    assert choose(ROWS + ROWS[:2], None, "", set(), key) == list(range(10))  # duplicates once


def test_too_many_rows_is_a_config_error():
    bench = GSM8K(
        data_files=str(FIXTURES / "gsm8k_test.jsonl"), n_select=2, n_heldout=3, num_fewshot=0
    )
    with pytest.raises(ConfigError, match="gsm8k.n_select=2"):
        _ = bench.selection


def test_one_pool_gives_disjoint_subsets_and_training_rows():
    bench = GSM8K(
        data_files=str(FIXTURES / "gsm8k_train.jsonl"), n_select=3, n_heldout=2, num_fewshot=2
    )
    sel = {r["question"] for r in bench.selection.rows}
    held = {r["question"] for r in bench.heldout.rows}
    shots = {r["question"] for r in bench.selection.shots}
    train = {e.prompt for e in bench.train_examples(20, seed=1)}
    assert len(sel) == 3 and len(held) == 2 and len(shots) == 2 and len(train) == 3
    assert not sel & held and not (sel | held) & shots
    assert not any(q in p for q in sel | held for p in train)
