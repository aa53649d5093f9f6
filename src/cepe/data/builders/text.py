"""What the task builders need beyond token stores: text in and out of both tokenizers, and the
source and category a document belongs to (read from its name)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np


@dataclass
class TextCodec:
    """The decoder's and the encoder's tokenizers (the same one when they agree)."""

    decoder: Any
    encoder: Any

    def dec(self, text: str) -> np.ndarray:
        return np.asarray(self.decoder(text, add_special_tokens=False)["input_ids"], dtype=np.int64)

    def enc(self, text: str) -> np.ndarray:
        return np.asarray(self.encoder(text, add_special_tokens=False)["input_ids"], dtype=np.int64)

    def decode(self, ids) -> str:
        return self.decoder.decode([int(i) for i in ids])

    def decode_encoder(self, ids) -> str:
        return self.encoder.decode([int(i) for i in ids])


def source_of(name: str) -> str:
    """The source a document comes from: its `.jsonl` file (`train/books/austen.jsonl:3` ->
    `train/books/austen.jsonl`), else its folder (`austen/emma.txt` -> `austen`)."""
    if ".jsonl:" in name:
        return name.rsplit(":", 1)[0]
    parent = str(PurePosixPath(name).parent)
    return parent if parent != "." else name


def category_of(name: str) -> str:
    """The category of a document: the folder holding its source (`train/books/austen.jsonl:3`
    -> `books`; `python3.11/json/decoder.py` -> `python3.11`, the input folder)."""
    if ".jsonl:" in name:
        parent = PurePosixPath(source_of(name)).parent
        return parent.name or source_of(name)
    parts = PurePosixPath(name).parts
    return parts[0] if len(parts) > 1 else name


def one_line(text: str) -> str:
    """Whitespace runs (line breaks too) -> one space: one example per line in a list."""
    return " ".join(text.split())
