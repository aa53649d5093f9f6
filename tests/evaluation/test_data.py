"""Inputs from local files, their fingerprint, and the result-file helpers."""

from __future__ import annotations

import json
import math

import pytest

from cepe.evaluation.data import fingerprint, load_documents, read_jsonl
from cepe.evaluation.report import format_table, write_results


def test_documents_from_folders_files_and_jsonl(tmp_path):
    """The training reader's names and order: paths from the folder's parent, `file.jsonl:line`;
    hidden folders left out; bytes that are not UTF-8 replaced (evaluation reads what it is given)."""
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "b.txt").write_text("bee")
    (root / "sub" / "a.py").write_text("print(1)")
    (root / ".hidden" / "c.txt").write_text("no")
    (root / "skip.bin").write_text("x")
    (root / "latin1.md").write_bytes("caf\xe9".encode("latin-1"))
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"body": "one"}\n\n{"body": "two"}\n')
    docs = load_documents([root, rows], text_key="body")
    assert [d.name for d in docs] == ["docs/b.txt", "docs/latin1.md", "docs/sub/a.py", "rows.jsonl:1", "rows.jsonl:3"]
    assert [d.text for d in docs] == ["bee", "caf\ufffd", "print(1)", "one", "two"]
    assert len(load_documents([root], max_docs=1)) == 1
    with pytest.raises(ValueError, match=r"rows.jsonl:1: no 'text' field \(found \['body'\]\); set --text-key"):
        load_documents([rows], text_key="text")
    with pytest.raises(FileNotFoundError, match="nope: no such file"):
        load_documents([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .txt/.py/.md files"):
        load_documents([tmp_path / "empty"])
    assert fingerprint([root])["files"] == 3  # the files that are read, no more


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
