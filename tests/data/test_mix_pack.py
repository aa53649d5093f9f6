"""GPU transfer packs (parts split by file, each unpackable alone) and the balanced subset."""

from __future__ import annotations

import hashlib
import json
import random
import tarfile
from pathlib import Path

import pytest

from cepe.data.mix.pack import pack_parts, plan_parts, subset


def _mix(root: Path, sizes: dict[str, tuple[str, int, int]]) -> Path:
    """A built-looking mix: name -> (split/category, documents, characters per document); random
    letters so that xz cannot shrink it much and small parts are forced."""
    rng = random.Random(0)
    sources = {}
    for name, (where, docs, chars) in sizes.items():
        split, cat = where.split("/")
        path = root / split / cat / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"source": f"{cat}/{name}", "title": f"{name}-{i}",
                             "text": "".join(rng.choice("abcdefghij klmnop\n") for _ in range(chars))}) + "\n"
                 for i in range(docs)]
        data = "".join(lines).encode()
        path.write_bytes(data)
        sources[name] = {"split": split, "category": cat, "path": f"{split}/{cat}/{name}.jsonl", "documents": docs,
                         "characters": docs * chars, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (root / "manifest.json").write_text(json.dumps({"sources": sources, "heldout": []}))
    return root


def test_plan_parts_by_file_heldout_first_and_refuses_oversize():
    parts = plan_parts({"train/a/x.jsonl": 40, "train/a/y.jsonl": 40, "heldout/b/z.jsonl": 30}, 75)
    assert parts == [["heldout/b/z.jsonl", "train/a/x.jsonl"], ["train/a/y.jsonl"]]
    with pytest.raises(ValueError, match="over one part"):
        plan_parts({"train/a/x.jsonl": 100}, 75)


def test_parts_unpack_alone_and_cover_every_file(tmp_path):
    out = _mix(tmp_path / "mix", {"a": ("train/books", 4, 3000), "b": ("train/code", 3, 3000),
                                  "c": ("heldout/books", 2, 3000)})
    parts = pack_parts(out, tmp_path / "packs", max_bytes=9000, jobs=1)
    assert len(parts) >= 2 and all(p["bytes"] <= 9000 for p in parts)
    sums = (tmp_path / "packs" / "SHA256SUMS").read_text().splitlines()
    seen = []
    for part, line in zip(parts, sums):
        data = (tmp_path / "packs" / part["name"]).read_bytes()
        assert line == f"{hashlib.sha256(data).hexdigest()}  {part['name']}"
        dest = tmp_path / "unpacked" / part["name"]
        with tarfile.open(tmp_path / "packs" / part["name"]) as tf:
            tf.extractall(dest, filter="data")
        assert (dest / "manifest.json").is_file()
        for f in part["files"]:
            assert (dest / f).read_bytes() == (out / f).read_bytes()
        seen += part["files"]
    assert sorted(seen) == sorted(p.relative_to(out).as_posix() for p in out.glob("*/*/*.jsonl"))
    assert parts[0]["files"][0].startswith("heldout/")


def test_subset_balances_categories_and_keeps_heldout_whole(tmp_path):
    out = _mix(tmp_path / "mix", {"big": ("train/code", 40, 500), "small": ("train/books", 4, 500),
                                  "mid": ("train/books", 20, 500), "held": ("heldout/books", 6, 500)})
    small = subset(out, tmp_path / "small", train_chars=16_000)
    s = small["sources"]
    assert s["held"]["documents"] == 6 and (tmp_path / "small/heldout/books/held.jsonl").read_bytes() == \
        (out / "heldout/books/held.jsonl").read_bytes()
    assert s["small"]["documents"] == 4  # less than its share: all of it, the rest goes to "mid"
    assert s["big"]["characters"] == pytest.approx(8000, abs=500)
    assert s["small"]["characters"] + s["mid"]["characters"] == pytest.approx(8000, abs=500)
    picked = (tmp_path / "small/train/code/big.jsonl").read_text().splitlines()
    original = (out / "train/code/big.jsonl").read_text().splitlines()
    assert set(picked) <= set(original) and picked[0] == original[0] and picked[-1] != original[-1]
    for e in s.values():
        assert e["sha256"] == hashlib.sha256((tmp_path / "small" / e["path"]).read_bytes()).hexdigest()
