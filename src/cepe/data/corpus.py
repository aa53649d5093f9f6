"""Read documents from the inputs a user has: folders of text or code, `.jsonl`, saved `datasets`.

Every document gets a stable name (its path relative to the input's parent folder, or
`file.jsonl:line`, or `dataset:row`), used for held-out splits, result files and error messages.
Training (`data.train`) and evaluation (`cepe eval --data`) both read documents here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Document:
    name: str
    text: str
    # the same document however it was reached (a file, or a folder above it): resolved path [:line]
    source: str = ""


@dataclass
class CorpusReport:
    """What reading the inputs found (kept with each run)."""

    files: int = 0
    documents: int = 0
    skipped_unreadable: list[str] = field(default_factory=list)


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_info.json").is_file()
        or (path / "dataset_dict.json").is_file()
        or (path / "state.json").is_file()
    )


def list_files(source: Path, extensions: list[str]) -> list[Path]:
    """Files of a folder with one of `extensions`, sorted, hidden folders left out."""
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    out = []
    for root, dirs, files in os.walk(source):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for f in sorted(files):
            if Path(f).suffix.lower() in exts:
                out.append(Path(root) / f)
    return out


ON_UNREADABLE = ("error", "skip", "replace")


@dataclass
class _Options:
    """How to read, and what to call the user's options in messages (training and evaluation
    name them differently)."""

    text_field: str = "text"
    on_unreadable: str = "error"  # error | skip | replace (bytes that are not UTF-8 become U+FFFD)
    field_option: str = "data.text_field"
    unreadable_hint: str = "set data.on_unreadable=skip"


def _read_text(path: Path, opt: _Options, report: CorpusReport) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace" if opt.on_unreadable == "replace" else "strict")
    except (UnicodeDecodeError, OSError) as e:
        if opt.on_unreadable == "skip":
            report.skipped_unreadable.append(str(path))
            return None
        reason = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else e.strerror or str(e)
        raise ValueError(f"{path}: unreadable ({reason}); fix or remove it, or {opt.unreadable_hint}") from e


def _iter_jsonl(path: Path, opt: _Options, report: CorpusReport, name: str | None = None) -> Iterator[Document]:
    """Rows of a `.jsonl` file, named `name:line` (`name`: the file's name, or inside a folder
    input its path from the input's parent, as files are: `train/books/austen.jsonl:3`)."""
    name = name or path.name
    text_field, on_unreadable = opt.text_field, opt.on_unreadable
    try:
        handle = path.open(encoding="utf-8", errors="replace" if on_unreadable == "replace" else "strict")
    except OSError as e:
        if on_unreadable == "skip":
            report.skipped_unreadable.append(str(path))
            return
        raise ValueError(f"{path}: unreadable ({e.strerror or e})") from e
    with handle:
        try:
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
                if not isinstance(row, dict) or text_field not in row:
                    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise ValueError(f"{path}:{lineno}: no {text_field!r} field (found {keys}); set {opt.field_option}")
                yield Document(f"{name}:{lineno}", str(row[text_field]), f"{path.resolve()}:{lineno}")
        except UnicodeDecodeError as e:
            if on_unreadable == "skip":
                report.skipped_unreadable.append(str(path))
                return
            raise ValueError(f"{path}: unreadable (not UTF-8 text); fix it or {opt.unreadable_hint}") from e


def _iter_dataset(path: Path, opt: _Options) -> Iterator[Document]:
    text_field = opt.text_field
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"{path} is a saved Hugging Face `datasets` dataset, but `datasets` is not installed: "
            "pip install datasets"
        ) from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{path}: a DatasetDict without a 'train' split (splits: {list(ds)})")
        ds = ds["train"]
    if text_field not in ds.column_names:
        raise ValueError(f"{path}: no {text_field!r} column (columns: {ds.column_names}); set {opt.field_option}")
    for i, row in enumerate(ds):
        yield Document(f"{path.name}:{i}", str(row[text_field]), f"{path.resolve()}:{i}")


def iter_documents(
    sources: list[str],
    text_field: str = "text",
    extensions: list[str] = (".txt", ".py", ".md"),
    max_files: int | None = None,
    on_unreadable: str = "error",
    report: CorpusReport | None = None,
    *,
    source_option: str = "data.train",
    field_option: str = "data.text_field",
    unreadable_hint: str = "set data.on_unreadable=skip",
) -> Iterator[Document]:
    """Yield every document of every source, in a fixed order (sorted paths, file order).
    `on_unreadable`: "error", "skip" (listed in `report`) or "replace" (undecodable bytes become
    U+FFFD). The `*_option` / `*_hint` strings name the caller's options in error messages."""
    if on_unreadable not in ON_UNREADABLE:
        raise ValueError(f"on_unreadable must be one of {ON_UNREADABLE}, got {on_unreadable!r}")
    opt = _Options(text_field, on_unreadable, field_option, unreadable_hint)
    report = report if report is not None else CorpusReport()
    for src in sources:
        path = Path(src).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{source_option}: {src} does not exist")
        if is_saved_dataset(path):
            report.files += 1
            for doc in _iter_dataset(path, opt):
                report.documents += 1
                yield doc
            continue
        files = list_files(path, extensions) if path.is_dir() else [path]
        if not files:
            raise ValueError(f"{path}: no files with extensions {list(extensions)}: empty corpus")
        base = path.parent
        for f in files:
            if max_files is not None and report.files >= max_files:
                return
            report.files += 1
            if f.suffix.lower() == ".jsonl":
                for doc in _iter_jsonl(f, opt, report, f.relative_to(base).as_posix()):
                    report.documents += 1
                    yield doc
                continue
            text = _read_text(f, opt, report)
            if text is not None:
                report.documents += 1
                yield Document(f.relative_to(base).as_posix(), text, str(f.resolve()))


def matches(name: str, pattern: str) -> bool:
    """Does a document name match a held-out pattern?

    `email/` matches any document under a folder named `email`; `persuasion.txt` matches that
    file name in any folder; patterns with `*`, `?` or `[` are globs on the whole name."""
    from fnmatch import fnmatch

    if any(c in pattern for c in "*?["):
        return fnmatch(name, pattern)
    if pattern.endswith("/"):
        return ("/" + pattern) in ("/" + name)
    return name == pattern or name.endswith("/" + pattern)
