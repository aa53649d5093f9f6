"""Evaluation inputs from ordinary local files: text folders, `.jsonl`, and their fingerprint."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

from ..data.corpus import Document, is_saved_dataset, iter_documents, list_files

TEXT_SUFFIXES = (".txt", ".py", ".md")


def text_files(path: str | Path) -> list[Path]:
    """A folder (every .txt/.py/.md below it, as the training reader lists them: sorted, hidden
    folders and __pycache__ left out) or a single file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir() and not is_saved_dataset(path):
        files = list_files(path, list(TEXT_SUFFIXES))
        if not files:
            raise FileNotFoundError(f"{path}: no {'/'.join(TEXT_SUFFIXES)} files in this folder")
        return files
    return [path]


def read_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> list[dict]:
    """Rows of a `.jsonl` file; a clear error names the file, line and missing field."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e})") from e
            missing = [k for k in required if k not in row]
            if missing:
                raise ValueError(f"{path}:{i}: missing field(s) {missing}")
            rows.append(row)
    return rows


def load_documents(paths: list[str | Path], text_key: str = "text", max_docs: int | None = None) -> list[Document]:
    """Documents from folders / text files (one per file, named by their path from the folder's
    parent, e.g. `austen/emma.txt`), `.jsonl` files (one per row, text under `text_key`, named
    `file.jsonl:line`) and saved `datasets`: the training reader (`cepe.data.corpus`), with bytes
    that are not UTF-8 replaced instead of refused."""
    for p in paths:
        text_files(p)  # a missing path or an empty folder: the evaluation's own message
    docs = iter_documents([str(p) for p in paths], text_key, list(TEXT_SUFFIXES), on_unreadable="replace",
                          source_option="--data", field_option="--text-key", unreadable_hint="pass other files")
    out = list(itertools.islice(docs, max_docs) if max_docs else docs)
    if not out:
        raise ValueError(f"no documents in {[str(p) for p in paths]}")
    return out


def _input_files(path: str | Path) -> list[Path]:
    path = Path(path).expanduser()
    if is_saved_dataset(path):  # every file of a saved dataset: its data and its metadata
        return sorted(f for f in path.rglob("*") if f.is_file())
    return text_files(path)


def fingerprint(paths: list[str | Path]) -> dict:
    """sha256 over the bytes of every input file (sorted by path), plus the file count."""
    h = hashlib.sha256()
    files = sorted({f for p in paths for f in _input_files(p)})
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return {"sha256": h.hexdigest(), "files": len(files), "paths": [str(p) for p in paths]}
