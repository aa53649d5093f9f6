"""The mix builder on a fake fetched folder: the writer's format, packing into long documents, the
held-out rule (by source, no held-out text in train), the manifest and determinism."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cepe.data.corpus import iter_documents
from cepe.data.mix import build as mix_build
from cepe.data.mix.fetch import DONE, unpacked_dir
from cepe.data.mix.sources import BY_NAME, CATEGORIES, HELDOUT, PACKAGES, PY_HELDOUT, SOURCES, Source

from data_helpers import text_of

DOCS = Source("pg", "techdocs", ("postgresql-doc-15",), ("html/*.html",), "html_page", root="d", split="heldout")
TRAIN_DOCS = Source("sq", "techdocs", ("sqlite3-doc",), ("*.html",), "html_page", root="d")
CODE = Source("py", "code", ("libpython3.11-stdlib",), ("**/*.py",), root="lib", drop=("json/",), cap_chars=5_000)
CODE_HELD = Source("py_held", "code", ("libpython3.11-stdlib",), ("**/*.py",), root="lib", keep=("json/",),
                   split="heldout")
FAKE = [DOCS, TRAIN_DOCS, CODE, CODE_HELD]


def _page(i: int, words: int = 300) -> str:
    return f"<html><body><h1>Page {i}</h1><p>{text_of(i, words)}</p></body></html>"


@pytest.fixture()
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    pg = unpacked_dir(root, PACKAGES["postgresql-doc-15"]) / "d" / "html"
    sq = unpacked_dir(root, PACKAGES["sqlite3-doc"]) / "d"
    lib = unpacked_dir(root, PACKAGES["libpython3.11-stdlib"]) / "lib"
    for d in (pg, sq, lib / "json", lib / "email"):
        d.mkdir(parents=True)
    for i in range(6):
        (pg / f"p{i}.html").write_text(_page(i))
    for i in range(10, 16):
        (sq / f"s{i}.html").write_text(_page(i))
    (sq / "copy.html").write_text(_page(3))  # a held-out page inside a train package
    for i in range(8):
        (lib / "email" / f"m{i}.py").write_text(f"def f{i}():\n    return {i}\n" + "# " + text_of(i + 20, 200))
    (lib / "json" / "decoder.py").write_text("import re\n# " + text_of(40, 200))
    for d in (pg.parent.parent, sq.parent, lib.parent):
        (d / DONE).write_text("fake\n")
    return root


def _build(src: Path, out: Path, **kw) -> dict:
    return mix_build.build(src, out, jobs=1, progress=False, command="test", sources=FAKE, doc_chars=4000, **kw)


def test_writer_format_and_layout(src, tmp_path):
    out = tmp_path / "out"
    _build(src, out)
    files = sorted(p.relative_to(out).as_posix() for p in out.glob("*/*/*.jsonl"))
    assert files == ["heldout/code/py_held.jsonl", "heldout/techdocs/pg.jsonl", "train/code/py.jsonl",
                     "train/techdocs/sq.jsonl"]
    for f in files:
        for line in (out / f).read_text().splitlines():
            row = json.loads(line)
            assert set(row) == {"source", "title", "text"}
            assert row["source"] == f"{f.split('/')[1]}/{Path(f).stem}"
    # the project's reader takes the files as they are
    docs = list(iter_documents([str(out / "train")], extensions=[".jsonl"]))
    assert docs and all(d.text for d in docs)


def test_pages_concatenated_in_order_with_titles(src, tmp_path):
    out = tmp_path / "out"
    _build(src, out)
    rows = [json.loads(x) for x in (out / "heldout/techdocs/pg.jsonl").read_text().splitlines()]
    assert all(len(r["text"]) >= 4000 for r in rows[:-1])
    titles = [t for r in rows for t in r["title"].split(" | ")]
    assert titles == [f"html/p{i}.html" for i in range(6)]
    assert rows[0]["text"].startswith("Page 0") and rows[0]["text"].index("Page 1") > 0


def test_code_path_headers_and_cap(src, tmp_path):
    out = tmp_path / "out"
    manifest = _build(src, out)
    text = "".join(json.loads(x)["text"] for x in (out / "train/code/py.jsonl").read_text().splitlines())
    assert text.startswith("==> email/m0.py <==\ndef f0():")
    assert "json/decoder.py" not in text
    entry = manifest["sources"]["py"]
    assert entry["capped"] and entry["pieces"] < 8 and entry["characters"] < 5_000 + 2_000


def test_heldout_text_never_reaches_train(src, tmp_path):
    out = tmp_path / "out"
    manifest = _build(src, out)
    assert manifest["heldout"] == ["pg", "py_held"]
    assert manifest["sources"]["sq"]["dropped_heldout_copies"] == 1
    held = "".join(
        (out / "heldout" / c / f).read_text() for c, f in (("techdocs", "pg.jsonl"), ("code", "py_held.jsonl"))
    )
    train = "".join(p.read_text() for p in (out / "train").glob("*/*.jsonl"))
    assert "Page 3" in held and "Page 3" not in train
    assert "json/decoder.py" in held and "json/decoder.py" not in train
    assert '"source": "techdocs/pg"' not in train and '"code/py_held"' not in train


def test_manifest_describes_each_file(src, tmp_path):
    out = tmp_path / "out"
    _build(src, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "test" and set(manifest["sources"]) == {"pg", "sq", "py", "py_held"}
    for e in manifest["sources"].values():
        data = (out / e["path"]).read_bytes()
        assert e["sha256"] == hashlib.sha256(data).hexdigest() and e["bytes"] == len(data)
        rows = [json.loads(x) for x in data.decode().splitlines()]
        assert e["documents"] == len(rows) and e["characters"] == sum(len(r["text"]) for r in rows)
        assert e["packages"][0]["version"] == PACKAGES[e["packages"][0]["name"]].version
    assert manifest["totals"]["heldout"]["techdocs"]["sources"] == 1
    assert "heldout" in mix_build.format_table(manifest)


def test_same_input_same_bytes(src, tmp_path):
    _build(src, tmp_path / "a")
    _build(src, tmp_path / "b")
    for p in sorted((tmp_path / "a").rglob("*.json*")):
        assert p.read_bytes() == (tmp_path / "b" / p.relative_to(tmp_path / "a")).read_bytes(), p


def test_missing_inputs_name_the_fetch_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="cepe data fetch"):
        mix_build.build_source(DOCS, tmp_path, tmp_path / "out")


def test_split_rule_is_fixed_by_source():
    assert set(HELDOUT) == {"moby_dick", "postgresql_docs", "octave_manual", "ruby_stdlib", "austen_persuasion",
                            "python_stdlib_heldout"}
    assert {s.category for s in SOURCES} == set(CATEGORIES)
    assert len({s.name for s in SOURCES}) == len(SOURCES)
    # where one package feeds both splits, train drops exactly what held-out keeps
    assert BY_NAME["python_stdlib"].drop == BY_NAME["python_stdlib_heldout"].keep == PY_HELDOUT
    assert BY_NAME["austen_novels"].drop == BY_NAME["austen_persuasion"].keep == ("persuasion.txt",)
    assert not any("sword" in p or "bible" in p for p in PACKAGES)


MIX = Path("/work/data/mix")


@pytest.mark.skipif(not (MIX / "manifest.json").is_file(), reason="the built mix is not on this machine")
def test_built_mix_keeps_heldout_out_of_train():
    manifest = json.loads((MIX / "manifest.json").read_text())
    for name in HELDOUT:
        assert manifest["sources"][name]["split"] == "heldout"
        assert not list((MIX / "train").glob(f"*/{name}.jsonl"))
    held_hashes, held_sources = set(), set()
    for p in (MIX / "heldout").glob("*/*.jsonl"):
        for line in p.open():
            row = json.loads(line)
            held_hashes.add(hashlib.sha256(row["text"].encode()).hexdigest())
            held_sources.add(row["source"])
    for p in (MIX / "train").glob("*/*.jsonl"):
        for line in p.open():
            row = json.loads(line)
            assert row["source"] not in held_sources
            assert hashlib.sha256(row["text"].encode()).hexdigest() not in held_hashes
