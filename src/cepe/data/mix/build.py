"""Clean the fetched packages and write the mix (`cepe data build --dir DIR --out OUT`).

Output: `OUT/<split>/<category>/<source>.jsonl`, one `{"source", "title", "text"}` per line, and
`OUT/manifest.json`. Short pieces (doc pages, man pages, dictionary entries, code files) are
concatenated in their natural (sorted-path) order into documents of at least `doc_chars`
characters, so 4K+-token contexts exist; a document's title lists its pieces' titles. Code pieces
get a `==> path <==` header line and documents stay within one folder where they can.

Held-out sources are built first; any train piece whose text equals a held-out piece is dropped,
so held-out text cannot reach train through another package. Same inputs give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import posixpath
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from functools import lru_cache, partial
from pathlib import Path

from tqdm import tqdm

from ..corpus import matches
from .clean import CLEANERS, normalize
from .fetch import unpacked_dir
from .sources import PACKAGES, SOURCES, Source

DOC_CHARS = 64_000
MIN_PIECE_CHARS = 64  # empty pages, stubs and one-line files carry no context
MIN_DOC_CHARS = 200


@dataclass(frozen=True)
class Input:
    title: str
    path: Path
    member: str | None = None  # a file inside the zip at `path`

    def read(self) -> bytes:
        if self.member is not None:
            return _open_zip(self.path).read(self.member)
        data = self.path.read_bytes()
        if self.path.suffix in (".gz", ".dz"):  # dictzip (.dz) is gzip too
            import gzip

            data = gzip.decompress(data)
        return data


@lru_cache(maxsize=2)
def _open_zip(path: Path) -> zipfile.ZipFile:
    """Reading thousands of members through one handle, not one central-directory parse each."""
    return zipfile.ZipFile(path)


def list_inputs(src_dir: Path, source: Source) -> list[Input]:
    """The source's files, sorted by title (the path below `root`, without `.gz`), each title once
    (the first package listed wins), symlinks and files over `max_file_bytes` left out."""
    found: dict[str, Input] = {}
    for name in source.packages:
        base = unpacked_dir(src_dir, PACKAGES[name]) / source.root
        for pattern in source.files:
            if "!" in pattern:
                archive, member_glob = pattern.split("!", 1)
                for zpath in sorted(base.glob(archive)):
                    with zipfile.ZipFile(zpath) as z:
                        for info in z.infolist():
                            if fnmatch(info.filename, member_glob) and not info.is_dir():
                                if source.max_file_bytes is None or info.file_size <= source.max_file_bytes:
                                    found.setdefault(info.filename, Input(info.filename, zpath, info.filename))
                continue
            for path in base.glob(pattern):
                if path.is_symlink() or not path.is_file():
                    continue
                if source.max_file_bytes is not None and path.stat().st_size > source.max_file_bytes:
                    continue
                title = path.relative_to(base).as_posix().removesuffix(".gz")
                found.setdefault(title, Input(title, path))
    return [found[t] for t in sorted(found) if not any(matches(t, p) for p in source.drop)]


def iter_pieces(inputs: list[Input], source: Source) -> Iterator[tuple[str, str]]:
    """Cleaned, normalized pieces, filtered by the source's `keep` / `drop` title patterns."""
    clean = CLEANERS[source.cleaner]
    for item in inputs:
        for title, text in clean(item.title, item.read(), item.path):
            if source.keep and not any(matches(title, p) for p in source.keep):
                continue
            if any(matches(title, p) for p in source.drop):
                continue
            text = normalize(text)
            if len(text) >= MIN_PIECE_CHARS:
                yield title, text


def pack(pieces: Iterator[tuple[str, str]], doc_chars: int, code: bool) -> Iterator[tuple[str, str]]:
    """Concatenate pieces into documents of at least `doc_chars` characters (a longer piece is one
    document). For code, each piece gets a path header and a folder change ends a document that is
    already half full, so documents mostly hold one folder."""
    titles: list[str] = []
    parts: list[str] = []
    size, folder = 0, None

    def flush():
        text = "\n\n".join(parts)
        return (" | ".join(titles), text) if len(text) >= MIN_DOC_CHARS else None

    for title, text in pieces:
        here = posixpath.dirname(title)
        if parts and (size >= doc_chars or (code and here != folder and size >= doc_chars // 2)):
            if (doc := flush()) is not None:
                yield doc
            titles, parts, size = [], [], 0
        if code:
            text = f"==> {title} <==\n{text}"
        titles.append(title)
        parts.append(text)
        size += len(text) + 2
        folder = here
    if parts and (doc := flush()) is not None:
        yield doc


def piece_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def output_path(out: Path, source: Source) -> Path:
    return Path(out) / source.split / source.category / f"{source.name}.jsonl"


def build_source(source: Source, src_dir: Path, out: Path, doc_chars: int = DOC_CHARS,
                 heldout_hashes: frozenset[str] = frozenset()) -> dict:
    """Write one source's file; return its manifest entry (and, for held-out sources, the hashes
    of its pieces under "_hashes")."""
    inputs = list_inputs(src_dir, source)
    if not inputs:
        raise FileNotFoundError(
            f"{source.name}: no input files matched {list(source.files)} in "
            f"{[str(unpacked_dir(src_dir, PACKAGES[p])) for p in source.packages]}; run `cepe data fetch`"
        )
    seen: set[str] = set()
    stats = {"pieces": 0, "dropped_duplicates": 0, "dropped_heldout_copies": 0, "capped": False}

    def admitted() -> Iterator[tuple[str, str]]:
        total = 0
        for title, text in iter_pieces(inputs, source):
            h = piece_hash(text)
            if h in seen:
                stats["dropped_duplicates"] += 1
                continue
            if h in heldout_hashes:
                stats["dropped_heldout_copies"] += 1
                continue
            if source.cap_chars is not None and total >= source.cap_chars:
                stats["capped"] = True
                return
            seen.add(h)
            stats["pieces"] += 1
            total += len(text)
            yield title, text

    path = output_path(out, source)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    digest, docs, chars = hashlib.sha256(), 0, 0
    with open(tmp, "wb") as f:
        for title, text in pack(admitted(), doc_chars, code=source.category == "code"):
            row = {"source": f"{source.category}/{source.name}", "title": title, "text": text}
            line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
            f.write(line)
            digest.update(line)
            docs += 1
            chars += len(text)
    os.replace(tmp, path)
    entry = {
        "category": source.category, "split": source.split, "path": path.relative_to(out).as_posix(),
        "packages": [{"registry": PACKAGES[p].registry, "name": p, "version": PACKAGES[p].version,
                      "licence": PACKAGES[p].licence} for p in source.packages],
        "cleaner": source.cleaner, "files": len(inputs), "documents": docs, "characters": chars,
        "bytes": path.stat().st_size, "sha256": digest.hexdigest(), **stats,
    }
    if source.split == "heldout":
        entry["_hashes"] = sorted(seen)
    return entry


def _run_phase(sources: list[Source], work, jobs: int, progress: bool, results: dict) -> None:
    bar = tqdm(total=len(sources), desc="build", unit="src", disable=not progress)
    if jobs <= 1 or len(sources) <= 1:
        mapped = map(work, sources)
    else:
        pool = multiprocessing.get_context("fork").Pool(jobs)
        mapped = pool.imap_unordered(work, sources)
    for entry in mapped:
        name = Path(entry["path"]).stem
        results[name] = entry
        bar.set_postfix_str(name)
        bar.update()
        if progress:
            tqdm.write(f"{entry['split']:8s} {entry['path']:48s} {entry['documents']:7d} docs "
                       f"{entry['characters'] / 1e6:8.2f} M chars")
    bar.close()
    if jobs > 1 and len(sources) > 1:
        pool.close()
        pool.join()


def build(src_dir: Path, out: Path, names: list[str] | None = None, doc_chars: int = DOC_CHARS,
          jobs: int = 2, progress: bool = True, command: str = "", sources: list[Source] = SOURCES) -> dict:
    """Build the named sources (default: all) into `out`; update and return `out/manifest.json`.
    Held-out sources always run first (all of them), so train pieces can be checked against them."""
    out, src_dir = Path(out), Path(src_dir)
    unknown = sorted(set(names or ()) - {s.name for s in sources})
    if unknown:
        raise ValueError(f"unknown sources {unknown}; known: {[s.name for s in sources]}")
    wanted = [s for s in sources if not names or s.name in names]
    started = time.time()
    results: dict[str, dict] = {}
    heldout = [s for s in sources if s.split == "heldout"]
    _run_phase(heldout, partial(build_source, src_dir=src_dir, out=out, doc_chars=doc_chars), jobs, progress, results)
    hashes = frozenset(h for e in results.values() for h in e.pop("_hashes"))
    train = [s for s in wanted if s.split == "train"]
    # the largest inputs first, so the two workers finish together
    train.sort(key=lambda s: (s.category != "code", s.name))
    work = partial(build_source, src_dir=src_dir, out=out, doc_chars=doc_chars, heldout_hashes=hashes)
    _run_phase(train, work, jobs, progress, results)
    manifest_path = out / "manifest.json"
    old = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    entries = {**old.get("sources", {}), **results}
    manifest = {
        "format": "OUT/<split>/<category>/<source>.jsonl, one JSON object per line: source, title, text",
        "command": command, "doc_chars": doc_chars,
        "heldout": sorted(s.name for s in heldout),
        "sources": {k: entries[k] for k in sorted(entries)},
        "totals": totals(entries),
    }
    manifest_path.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    manifest["seconds"] = round(time.time() - started, 1)  # printed, not saved: the manifest stays reproducible
    return manifest


def totals(entries: dict[str, dict]) -> dict:
    """{split: {category: {sources, documents, characters, bytes}}}."""
    out: dict[str, dict] = {}
    for e in entries.values():
        row = out.setdefault(e["split"], {}).setdefault(
            e["category"], {"sources": 0, "documents": 0, "characters": 0, "bytes": 0}
        )
        row["sources"] += 1
        for k in ("documents", "characters", "bytes"):
            row[k] += e[k]
    return {s: {c: out[s][c] for c in sorted(out[s])} for s in sorted(out)}


def format_table(manifest: dict) -> str:
    lines = [f"{'split':8s} {'category':10s} {'sources':>7s} {'docs':>8s} {'M chars':>9s} {'MB':>8s}"]
    for split, cats in manifest["totals"].items():
        for cat, row in cats.items():
            lines.append(f"{split:8s} {cat:10s} {row['sources']:7d} {row['documents']:8d} "
                         f"{row['characters'] / 1e6:9.2f} {row['bytes'] / 1e6:8.2f}")
    return "\n".join(lines)
