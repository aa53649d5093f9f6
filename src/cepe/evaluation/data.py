"""Evaluation inputs from ordinary local files: text folders, `.jsonl`, and their fingerprint."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".py", ".md")


@dataclass
class Document:
    name: str
    text: str


def text_files(path: str | Path) -> list[Path]:
    """A folder (every .txt/.py/.md below it, sorted) or a single file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
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
    """Documents from folders / text files (one document per file) and `.jsonl` files (one per
    row, text under `text_key`)."""
    docs: list[Document] = []
    for path in paths:
        for f in text_files(path):
            if f.suffix == ".jsonl":
                for i, row in enumerate(read_jsonl(f, (text_key,))):
                    docs.append(Document(f"{f.name}:{i}", str(row[text_key])))
            else:
                docs.append(Document(f.name, f.read_text(encoding="utf-8", errors="replace")))
    if not docs:
        raise ValueError(f"no documents in {[str(p) for p in paths]}")
    return docs[:max_docs] if max_docs else docs


def fingerprint(paths: list[str | Path]) -> dict:
    """sha256 over the bytes of every input file (sorted by path), plus the file count."""
    h = hashlib.sha256()
    files = sorted({f for p in paths for f in text_files(p)} if paths else [])
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return {"sha256": h.hexdigest(), "files": len(files), "paths": [str(p) for p in paths]}
