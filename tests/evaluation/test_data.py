"""Inputs from local files, their fingerprint, and the result-file helpers."""

from __future__ import annotations

import json
import math

import pytest

from cepe.evaluation.data import fingerprint, load_documents, read_jsonl
from cepe.evaluation.report import format_table, write_results


def test_documents_from_folders_files_and_jsonl(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "sub" / "a.py").write_text("print(1)")
    (tmp_path / "skip.bin").write_text("x")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"body": "one"}\n\n{"body": "two"}\n')
    docs = load_documents([tmp_path, rows], text_key="body")
    assert [d.name for d in docs] == ["b.txt", "a.py", "rows.jsonl:0", "rows.jsonl:1"]
    assert [d.text for d in docs] == ["bee", "print(1)", "one", "two"]
    assert len(load_documents([tmp_path], max_docs=1)) == 1
    with pytest.raises(ValueError, match=r"rows.jsonl:1: missing field"):
        load_documents([rows], text_key="text")
    with pytest.raises(FileNotFoundError):
        load_documents([tmp_path / "nope"])


def test_fingerprint_follows_the_bytes(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one")
    first = fingerprint([tmp_path])
    assert first["files"] == 1 and first == fingerprint([tmp_path])
    f.write_text("two")
    assert fingerprint([tmp_path])["sha256"] != first["sha256"]


def test_read_jsonl_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        read_jsonl(bad)


def test_write_results_and_table(tmp_path):
    path = write_results(tmp_path, "r", "ppl", {"x": 1}, {"sha256": "0"}, {"ppl": float("nan"), "v": [1.5]},
                         {"total_s": 1.0}, {"device": "cpu"})
    out = json.loads(path.read_text())
    assert out["task"] == "ppl" and out["results"]["ppl"] is None and out["code_version"]
    table = format_table(["m", "a"], [["x", 1.23456], ["y", None], ["z", 123.456], ["w", math.inf]])
    assert table.splitlines()[2:] == ["x   1.235", "y       -", "z  123.46", "w       -"]
