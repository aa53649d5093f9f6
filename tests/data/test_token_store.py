"""Reading corpora and the memory-mapped token store."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from data_helpers import text_of, word_tokenizer, words, write_corpus

from cepe.data import DataConfig, build_token_stores, byte_tokenizer, iter_documents
from cepe.data.corpus import CorpusReport
from cepe.data.pipeline import load_token_stores
from cepe.data.token_store import TokenStore


def test_folder_jsonl_and_file_documents(tmp_path):
    root = write_corpus(tmp_path / "corpus", {"a.txt": 20, "pkg/b.py": 30, "pkg/skip.bin": 5, ".hidden/c.txt": 5})
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": "first row"}) + "\n\n" + json.dumps({"text": "second", "id": 2}) + "\n")
    docs = list(iter_documents([str(root), str(rows)], extensions=[".txt", ".py"]))
    assert [d.name for d in docs] == ["corpus/a.txt", "corpus/pkg/b.py", "rows.jsonl:1", "rows.jsonl:3"]
    assert docs[0].text == (root / "a.txt").read_text()
    assert docs[3].text == "second"
    assert [d.name for d in iter_documents([str(root)], max_files=1)] == ["corpus/a.txt"]


def test_bad_inputs_name_the_file(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"{empty}.*empty corpus"):
        list(iter_documents([str(empty)]))
    with pytest.raises(FileNotFoundError, match="nope"):
        list(iter_documents([str(tmp_path / "nope")]))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ok.txt").write_text("fine")
    (bad / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: unreadable \(not UTF-8"):
        list(iter_documents([str(bad)]))
    report = CorpusReport()
    assert [d.name for d in iter_documents([str(bad)], on_unreadable="skip", report=report)] == ["bad/ok.txt"]
    assert report.skipped_unreadable == [str(bad / "latin1.txt")]
    assert [d.text for d in iter_documents([str(bad)], on_unreadable="replace")] == ["caf\ufffd", "fine"]
    with pytest.raises(ValueError, match="on_unreadable must be one of"):
        list(iter_documents([str(bad)], on_unreadable="ignore"))
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(ValueError, match=r"rows\.jsonl:2: no 'text' field \(found \['body'\]\)"):
        list(iter_documents([str(rows)]))
    rows.write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(ValueError, match=r"rows\.jsonl:2: not valid JSON"):
        list(iter_documents([str(rows)]))


def test_saved_dataset_needs_datasets(tmp_path):
    ds = tmp_path / "saved"
    ds.mkdir()
    (ds / "dataset_info.json").write_text("{}")
    (ds / "state.json").write_text("{}")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=f"{ds} is a saved Hugging Face `datasets` dataset.*pip install datasets"):
            list(iter_documents([str(ds)]))
    else:
        pytest.skip("datasets is installed here")


def test_store_round_trip_and_limits(tmp_path):
    root = write_corpus(tmp_path / "c", {"a.txt": 40, "b.txt": 0, "c.txt": 60})
    tok = byte_tokenizer()
    stores = build_token_stores(iter_documents([str(root)]), {"decoder": tok}, tmp_path / "store", progress=False)
    store = stores["decoder"]
    assert isinstance(store.tokens, np.memmap) and store.tokens.dtype == np.uint16
    assert store.names == ["c/a.txt", "c/b.txt", "c/c.txt"]
    assert store.doc_len(1) == 0
    for i, name in enumerate(store.names):
        text = (tmp_path / name).read_text()
        assert tok.decode(store.doc_tokens(i).tolist()) == text
        assert store.doc_len(i) == len(text.encode())  # one byte per token
        if store.doc_len(i):
            assert store.doc_ends(i)[-1] == len(text)
    reopened = TokenStore(tmp_path / "store" / "decoder")
    assert reopened.num_tokens == store.num_tokens
    # max_tokens stops after the document that reaches it
    first = len(text_of(0, 40).encode())
    s2 = build_token_stores(
        iter_documents([str(root)]), {"decoder": tok}, tmp_path / "s2", max_tokens=first - 5, progress=False
    )
    assert s2["decoder"].names == ["c/a.txt"]


def test_two_tokenizers_cover_the_same_text(tmp_path):
    """Encoder tokens that end before a decoder position hold exactly the text before it."""
    root = write_corpus(tmp_path / "c", {"a.txt": 300})
    text = (root / "a.txt").read_text()
    dec_tok, enc_tok = byte_tokenizer(), word_tokenizer()
    stores = build_token_stores(
        iter_documents([str(root)]), {"decoder": dec_tok, "encoder": enc_tok}, tmp_path / "s", progress=False
    )
    dec, enc = stores["decoder"], stores["encoder"]
    for p in (0, 1, 57, 400, dec.doc_len(0) - 1):
        c = dec.char_start(0, p)
        before = enc.doc_tokens(0)[: enc.tokens_before(0, c)]
        prefix = text[:c]
        if c < len(text) and text[c].isalnum():  # a word cut by the window's start is not before it
            prefix = re.sub(r"\w+$", "", prefix)
        assert words(enc_tok.decode(before.tolist())) == words(prefix)


def test_token_stores_are_cached(tmp_path):
    root = write_corpus(tmp_path / "c", {"a.txt": 50})
    cfg = DataConfig(train=[str(root)], cache_dir=str(tmp_path / "cache"))
    dec, enc, info = load_token_stores(cfg, byte_tokenizer(), word_tokenizer(), progress=False)
    assert not info["shared_tokenizer"] and dec is not enc
    again = load_token_stores(cfg, byte_tokenizer(), word_tokenizer(), progress=False)
    assert again[2]["store"] == info["store"]
    # one store when both sides use the same tokenizer
    d2, e2, info2 = load_token_stores(cfg, byte_tokenizer(), byte_tokenizer(), progress=False)
    assert info2["shared_tokenizer"] and d2 is e2
    (root / "a.txt").write_text("changed " * 30)  # content change -> new store
    assert load_token_stores(cfg, byte_tokenizer(), None, progress=False)[2]["store"] != info2["store"]


def test_empty_documents_only_is_an_error(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    (root / "a.txt").write_text("")
    cfg = DataConfig(train=[str(root)], cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=f"{root}.*empty"):
        load_token_stores(cfg, byte_tokenizer(), None, progress=False)
