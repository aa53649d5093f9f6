"""The small mix the builder tests share, laid out as `cepe data build` writes it
(OUT/train/<category>/<source>.jsonl), and readers of the samples built from it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cepe.data import DataConfig, build_data, byte_tokenizer

VOCAB = [f"{a}{b}{c}" for a in "bcdfglmnprstvz" for b in "aeiou" for c in ("n", "r", "st", "ll", "mo")]


def doc_text(rng: np.random.Generator, n_words: int, records: bool) -> str:
    """Random words (no phrase repeats by chance), code-like `key = value` lines in some."""
    lines = []
    while sum(len(x.split()) for x in lines) < n_words:
        if records and rng.random() < 0.3:
            lines.append(f"{rng.choice(VOCAB)}_{rng.integers(1000)} = {' '.join(rng.choice(VOCAB, 3))}")
        else:
            lines.append(" ".join(rng.choice(VOCAB, int(rng.integers(6, 16)))) + ".")
    return "\n".join(lines)


def write_mix(root: Path) -> Path:
    """Three documents per source: books (austen, melville), code (python, ruby), reference (wiki)."""
    rng = np.random.default_rng(0)
    for category, sources in {
        "books": ["austen", "melville"],
        "code": ["python", "ruby"],
        "reference": ["wiki"],
    }.items():
        for source in sources:
            path = root / "train" / category / f"{source}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            rows = [
                {"source": source, "title": f"{source} {i}", "text": doc_text(rng, 900, category == "code")}
                for i in range(3)
            ]
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def data_of(tmp_path, mix, **kw):
    base = {"train": [str(mix / "train")], "cache_dir": str(tmp_path / "cache"), "context_tokens": 1024,
            "min_context_tokens": 64, "decoder_tokens": 256, "extensions": [".jsonl"]}
    base.update(kw)
    tok = byte_tokenizer()
    return build_data(DataConfig(**base), tok, tok, progress=False), tok


def scored_runs(s: dict) -> list[tuple[int, int]]:
    """The task's answers: runs of `task_mask`, else labelled runs after the first unlabelled token."""
    if "task_mask" in s:
        lab, first = np.asarray(s["task_mask"], dtype=bool), 0
    else:
        lab = s["labels"] != -100
        first = int(np.argmin(lab[1:])) + 1
    runs, i = [], first
    while i < len(lab):
        if lab[i]:
            j = i
            while j < len(lab) and lab[j]:
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    return runs
