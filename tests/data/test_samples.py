"""Sample builders, mixtures, masking, held-out splits, the synthetic task."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
from data_helpers import word_tokenizer, words, write_corpus

from cepe.data import Collator, DataConfig, build_data, byte_tokenizer, split_documents
from cepe.data.config import RetrievalConfig
from cepe.data.synthetic import SyntheticConfig, make_example, value_ids


def _cfg(tmp_path, root, **kw) -> DataConfig:
    base = dict(train=[str(root)], cache_dir=str(tmp_path / "cache"), context_tokens=64, decoder_tokens=32)
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "c", {f"doc{i}.txt": 150 + 40 * i for i in range(6)} | {"tiny.txt": 3})


def test_long_document_context_precedes_the_window(tmp_path, corpus):
    dec_tok, enc_tok = byte_tokenizer(), word_tokenizer()
    data = build_data(_cfg(tmp_path, corpus, mixture={"long_document": 1.0}, min_context_tokens=16), dec_tok, enc_tok,
                      teacher_tokens=40, progress=False)
    assert data.report["skipped_short"] == {"long_document": 1}  # tiny.txt
    store = data.train.builders["long_document"].corpus.decoder
    for i in range(20):
        s = data.train[i]
        text = (corpus.parent / store.names[s["doc"]]).read_text()
        c = store.char_start(s["doc"], s["position"])
        window = dec_tok.decode(s["input_ids"].tolist())
        assert text[c:].startswith(window) and (s["labels"] == s["input_ids"]).all()
        (context,) = s["context"]
        assert 16 <= len(context) <= 64
        # exactly the last encoder tokens of the text before the window (a word cut by it excluded)
        before = re.sub(r"\w+$", "", text[:c]) if text[c : c + 1].isalnum() else text[:c]
        assert words(enc_tok.decode(context.tolist())) == words(before)[-len(context) :]
        # the online teacher reads the decoder tokens right before the window
        prefix = dec_tok.decode(s["teacher_prefix"].tolist())
        assert 0 < len(s["teacher_prefix"]) <= 40 and text[:c].endswith(prefix)


def test_warmup_encoder_reads_the_decoder_text(tmp_path, corpus):
    dec_tok, enc_tok = byte_tokenizer(), word_tokenizer()
    data = build_data(_cfg(tmp_path, corpus, mixture={"warmup": 1.0}), dec_tok, enc_tok, progress=False)
    for i in range(10):
        s = data.train[i]
        window = dec_tok.decode(s["input_ids"].tolist())
        enc_words = words(enc_tok.decode(s["context"][0].tolist()))
        # the same text, except a word cut at either edge of the window
        assert set(enc_words) <= set(words(window)) | {w for w in enc_words[:1]}
        assert len(enc_words) >= len(words(window)) - 2
        assert len(s["teacher_prefix"]) == 0


def test_retrieval_passages_come_from_other_documents(tmp_path, corpus):
    dec_tok, enc_tok = byte_tokenizer(), word_tokenizer()
    cfg = _cfg(tmp_path, corpus, mixture={"retrieval": 1.0})
    cfg.retrieval.k, cfg.retrieval.passage_tokens = 3, 64
    data = build_data(cfg, dec_tok, enc_tok, teacher_tokens=100, progress=False)
    builder = data.train.builders["retrieval"]
    for i in range(10):
        s = data.train[i]
        assert len(s["context"]) == 3 and all(len(c) > 5 for c in s["context"])
        assert 0 < len(s["teacher_prefix"]) <= 100
    doc, p = builder.pick_window(np.random.default_rng(0))
    hits = builder.pool.search("alpha beta gamma", 3, exclude_doc=doc)
    assert hits and all(builder.pool.spans[h, 0] != doc for h in hits)


def test_retrieval_k_range_draws_passage_counts_per_sample(tmp_path, corpus):
    from cepe.training.config import load_config

    cfg = _cfg(tmp_path, corpus, mixture={"retrieval": 1.0})
    cfg.retrieval.k, cfg.retrieval.passage_tokens = [1, 4], 32
    data = build_data(cfg, byte_tokenizer(), word_tokenizer(), progress=False)
    counts = {len(data.train[i]["context"]) for i in range(40)}
    assert counts == {1, 2, 3, 4}  # every count of the range, none outside it
    for bad in ([0, 3], [4, 2], 0):
        with pytest.raises(ValueError, match="retrieval.k"):
            DataConfig(train=["x"], retrieval=RetrievalConfig(k=bad)).validate()
    # an override spells the range as a list; a number stays a fixed k
    assert load_config(None, ["data.train=synthetic", "data.retrieval.k=[2,24]"]).data.retrieval.k == [2, 24]
    assert load_config(None, ["data.train=synthetic", "data.retrieval.k=5"]).data.retrieval.k == 5


def test_mixture_weights_masking_and_determinism(tmp_path, corpus):
    cfg = _cfg(
        tmp_path, corpus, mixture={"warmup": 1.0, "long_document": 3.0}, min_context_tokens=16, encoder_mask_prob=0.3
    )
    data = build_data(cfg, byte_tokenizer(), word_tokenizer(), progress=False)
    kinds = Counter(data.train[i]["kind"] for i in range(400))
    assert 0.68 < kinds["long_document"] / 400 < 0.82
    mask_id = word_tokenizer().mask_token_id
    masked = np.concatenate([c for i in range(50) for c in data.train[i]["context"]])
    assert 0.2 < (masked == mask_id).mean() < 0.4
    again = build_data(cfg, byte_tokenizer(), word_tokenizer(), progress=False)
    a, b = data.train[123], again.train[123]
    assert (a["input_ids"] == b["input_ids"]).all() and all((x == y).all() for x, y in zip(a["context"], b["context"]))


def test_every_document_too_short_is_an_error(tmp_path):
    root = write_corpus(tmp_path / "short", {"a.txt": 5, "b.txt": 8})
    with pytest.raises(
        ValueError, match=rf"{root}.*no document is long enough for the long_document builder.*2 of 2 documents skipped"
    ):
        build_data(_cfg(tmp_path, root), byte_tokenizer(), word_tokenizer(), progress=False)


def test_heldout_split_by_document(tmp_path):
    names = (
        [f"lib/email/m{i}.py" for i in range(3)]
        + [f"lib/x/f{i}.py" for i in range(20)]
        + ["books/persuasion.txt", "lib/json/a.py"]
    )
    held = split_documents(names, ["email/", "persuasion.txt"], 0.0, seed=0)
    assert [n for n, h in zip(names, held) if h] == names[:3] + ["books/persuasion.txt"]
    r1 = split_documents(names, ["json/"], 0.25, seed=1)
    assert (r1 == split_documents(names, ["json/"], 0.25, seed=1)).all()
    assert not (r1 == split_documents(names, ["json/"], 0.25, seed=2)).all()
    assert r1.sum() == 1 + round(0.25 * (len(names) - 1))
    with pytest.raises(ValueError, match="'asyncio/' matches no document"):
        split_documents(names, ["asyncio/"], 0.0, seed=0)


def test_heldout_documents_never_feed_training(tmp_path, corpus):
    cfg = _cfg(tmp_path, corpus, mixture={"long_document": 1.0}, min_context_tokens=16, heldout=["doc5.txt"])
    dec_tok = byte_tokenizer()
    data = build_data(cfg, dec_tok, word_tokenizer(), progress=False)
    assert data.split["heldout"] == ["c/doc5.txt"] and data.split["seed"] == 0
    held_text = (corpus / "doc5.txt").read_text()
    train_builder = data.train.builders["long_document"]
    assert 5 not in set(train_builder.docs.tolist())
    assert all(d == 5 for d in data.heldout.builders["long_document"].docs)
    assert dec_tok.decode(data.heldout[0]["input_ids"].tolist()) in held_text


def test_collator_shapes(tmp_path, corpus):
    data = build_data(_cfg(tmp_path, corpus, min_context_tokens=16), byte_tokenizer(), word_tokenizer(),
                      teacher_tokens=20, progress=False)
    batch = Collator(chunk_size=16, prefix=[2], suffix=[3], encoder_pad_id=0)([data.train[i] for i in range(3)])
    assert batch["input_ids"].shape == batch["labels"].shape == (3, 32)
    b, n, length = batch["context_input_ids"].shape
    assert b == 3 and length == 18 and n >= 1
    assert (batch["context_input_ids"][batch["context_attention_mask"].bool()].reshape(-1) >= 0).all()
    assert batch["teacher_prefix_ids"].shape == batch["teacher_prefix_mask"].shape
    assert batch["index"].tolist() == [0, 1, 2]


def test_synthetic_answers_only_in_the_context():
    cfg = SyntheticConfig(num_keys=16, num_values=16, num_facts=8, num_queries=4)
    ex = make_example(cfg, np.random.default_rng(0))
    facts = dict(zip(ex["context"][0::2].tolist(), ex["context"][1::2].tolist()))
    assert len(facts) == 8
    ids, labels = ex["input_ids"], ex["labels"]
    for q in range(4):
        key, value = ids[3 * q + 1], ids[3 * q + 2]
        assert facts[int(key)] == value == labels[3 * q + 2]
    assert (labels[labels != -100] >= value_ids(cfg)[0]).all()
    other = make_example(cfg, np.random.default_rng(1))
    assert not np.array_equal(ex["context"], other["context"])  # facts drawn afresh per example
