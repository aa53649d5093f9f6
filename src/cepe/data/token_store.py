"""Token store: a corpus tokenized once into memory-mapped numpy files.

One folder per tokenizer:
    tokens.bin   all documents' token ids end to end (uint16, or uint32 for vocabularies > 65,535)
    ends.bin     uint32 per token: character offset (in its document) where the token's text ends
    offsets.npy  int64 (n_docs + 1,): document i is tokens[offsets[i]:offsets[i+1]]
    names.json   document names;  meta.json  counts, dtype, tokenizer hash

Why character ends: the decoder and the encoder may use different tokenizers. A sample that
gives the decoder tokens [p, p+D) of a document must give the encoder the text *before* them.
The decoder's window starts after character c = ends[p-1]; the encoder tokens whose text ends at
or before c (a binary search in the encoder store's `ends`) cover exactly that preceding text,
never a character of the window. Both stores come from one pass over the corpus, so document i
is the same text in both.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .corpus import Document

STORE_VERSION = 1
BATCH_CHARS = 1 << 20  # characters per tokenizer call: large batches keep the Rust tokenizer busy


def tokenizer_hash(tokenizer: Any) -> str:
    """Identifies a tokenizer by its full serialized definition (vocabulary, merges, normalizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer: the token store needs character offsets")
    return hashlib.sha256(backend.to_str().encode()).hexdigest()[:16]


class TokenStore:
    """Read side of one tokenizer's store (memory-mapped: corpora larger than RAM are fine)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        try:
            self.meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{meta_path}: not a readable token store ({e}); delete the folder to rebuild it") from e
        if self.meta.get("version") != STORE_VERSION:
            raise ValueError(
                f"{self.folder}: token store version {self.meta.get('version')} != {STORE_VERSION}; "
                "delete it to rebuild"
            )
        n = self.meta["num_tokens"]
        dtype = np.dtype(self.meta["dtype"])
        # np.memmap refuses empty files: a store of empty documents holds no arrays
        self.tokens = (
            np.memmap(self.folder / "tokens.bin", dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
        )
        self.ends = (
            np.memmap(self.folder / "ends.bin", dtype=np.uint32, mode="r", shape=(n,)) if n else np.zeros(0, np.uint32)
        )
        self.offsets = np.load(self.folder / "offsets.npy")
        self.names: list[str] = json.loads((self.folder / "names.json").read_text())
        if len(self.offsets) != len(self.names) + 1 or int(self.offsets[-1]) != n:
            raise ValueError(f"{self.folder}: token store is inconsistent (truncated write?); delete it to rebuild")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def num_tokens(self) -> int:
        return int(self.meta["num_tokens"])

    def doc_len(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def doc_lens(self) -> np.ndarray:
        return np.diff(self.offsets)

    def doc_tokens(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def doc_ends(self, i: int) -> np.ndarray:
        return self.ends[self.offsets[i] : self.offsets[i + 1]]

    def char_start(self, i: int, p: int) -> int:
        """Character offset where the text after token p-1 of document i begins (0 for p = 0)."""
        return 0 if p == 0 else int(self.ends[self.offsets[i] + p - 1])

    def tokens_before(self, i: int, char: int) -> int:
        """Number of leading tokens of document i whose text ends at or before `char`."""
        return int(np.searchsorted(self.doc_ends(i), char, side="right"))


class _StoreWriter:
    def __init__(self, folder: Path, tokenizer: Any):
        self.folder = folder
        self.tokenizer = tokenizer
        vocab = len(tokenizer)
        self.dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32
        folder.mkdir(parents=True, exist_ok=True)
        self.tok_f = open(folder / "tokens.bin", "wb")
        self.end_f = open(folder / "ends.bin", "wb")
        self.offsets = [0]

    def encode(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Tokenize a batch of documents in one fast-tokenizer call: (ids, char ends) per document."""
        enc = self.tokenizer(
            texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False, verbose=False
        )
        out = []
        for ids, offs in zip(enc["input_ids"], enc["offset_mapping"]):
            ends = np.asarray([e for _, e in offs], dtype=np.uint32)
            # offsets can step back by a character around merged bytes: keep them monotonic
            out.append((np.asarray(ids, dtype=self.dtype), np.maximum.accumulate(ends) if len(ends) else ends))
        return out

    def write(self, docs: list[tuple[np.ndarray, np.ndarray]]) -> None:
        for ids, ends in docs:
            self.tok_f.write(ids.tobytes())
            self.end_f.write(ends.tobytes())
            self.offsets.append(self.offsets[-1] + len(ids))

    def close(self, names: list[str], tok_hash: str) -> None:
        self.tok_f.close()
        self.end_f.close()
        np.save(self.folder / "offsets.npy", np.asarray(self.offsets, dtype=np.int64))
        (self.folder / "names.json").write_text(json.dumps(names))
        meta = {
            "version": STORE_VERSION,
            "num_tokens": self.offsets[-1],
            "num_docs": len(names),
            "dtype": np.dtype(self.dtype).name,
            "tokenizer": tok_hash,
            "tokenizer_class": type(self.tokenizer).__name__,
        }
        (self.folder / "meta.json").write_text(json.dumps(meta, indent=1))


def build_token_stores(
    documents: Iterable[Document],
    tokenizers: dict[str, Any],
    folder: str | Path,
    max_tokens: int | None = None,
    progress: bool = True,
    count_with: str | None = None,
) -> dict[str, TokenStore]:
    """Tokenize `documents` once with each of `tokenizers` (name -> tokenizer) into
    `folder/<name>/`, streaming (batches of about 1M characters). `max_tokens` stops after the
    document that reaches that many tokens of tokenizer `count_with` (default: the first).
    Written to a temporary folder and renamed, so a killed build leaves no half store."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    writers = {name: _StoreWriter(tmp / name, tok) for name, tok in tokenizers.items()}
    count_with = count_with or next(iter(tokenizers))
    names: list[str] = []
    batch: list[str] = []
    batch_chars = 0
    total = 0
    bar = tqdm(desc="tokenizing", unit="doc", disable=not progress, dynamic_ncols=True)

    def flush() -> int:
        """Tokenize the pending batch; keep documents up to the one that reaches `max_tokens`."""
        encoded = {name: w.encode(batch) for name, w in writers.items()}
        lens = np.cumsum([len(ids) for ids, _ in encoded[count_with]])
        keep = len(batch)
        if max_tokens is not None and len(lens) and total + lens[-1] >= max_tokens:
            keep = int(np.searchsorted(total + lens, max_tokens)) + 1
        for name, w in writers.items():
            w.write(encoded[name][:keep])
        del names[len(names) - len(batch) + keep :]
        bar.update(keep)
        bar.set_postfix(tokens=f"{total + int(lens[keep - 1]) if keep else total:,}")
        return int(lens[keep - 1]) if keep else 0

    try:
        for doc in documents:
            names.append(doc.name)
            batch.append(doc.text)
            batch_chars += len(doc.text)
            if batch_chars >= BATCH_CHARS:
                total += flush()
                batch, batch_chars = [], 0
                if max_tokens is not None and total >= max_tokens:
                    break
        if batch:
            total += flush()
            batch = []
        bar.close()
        for w in writers.values():
            w.close(names, tokenizer_hash(w.tokenizer))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        for w in writers.values():
            w.tok_f.close()
            w.end_f.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return {name: TokenStore(folder / name) for name in tokenizers}


def open_token_stores(folder: str | Path, names: list[str]) -> dict[str, TokenStore] | None:
    """Stores built earlier in `folder`, or None if any is missing."""
    folder = Path(folder)
    if not all((folder / n / "meta.json").is_file() for n in names):
        return None
    return {n: TokenStore(folder / n) for n in names}
