"""BM25 (bm25s) and dense (mean-pooled encoder) retrieval on hand-made corpora."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert
from eval_helpers import char_tokenizer

from cepe.evaluation.retrieval import BM25Retriever, DenseRetriever, build_retriever

TEXTS = ["the cat sat on the mat", "dogs bark loudly at night", "a cat and a dog play", "stock markets fell"]


def test_bm25_ranks_and_excludes():
    r = BM25Retriever(TEXTS)
    hits = r.search("cat dog", 3)
    assert [i for i, _ in hits][:1] == [2] and len(hits) == 3
    assert hits[0][1] >= hits[1][1] >= hits[2][1]
    kept = r.search("cat dog", 3, exclude={2})
    assert 2 not in [i for i, _ in kept] and len(kept) == 3
    assert r.search("cat", 0) == []
    with pytest.raises(ValueError, match="empty"):
        BM25Retriever([])


def test_dense_retrieval_is_cosine_of_mean_pooled_states(tmp_path):
    tok = char_tokenizer()
    bert = tiny_bert(vocab=80)
    cache = tmp_path / "emb.safetensors"
    r = DenseRetriever(TEXTS, encoder=(bert, tok), cache=cache, progress=False)
    assert r.embeddings.shape == (4, 24)
    torch.testing.assert_close(r.embeddings.norm(dim=-1), torch.ones(4))
    # by hand: mean of the last hidden states over real tokens, normalised
    batch = tok([TEXTS[1]], return_tensors="pt")
    with torch.no_grad():
        h = bert(**batch).last_hidden_state[0].mean(0)
    torch.testing.assert_close(r.embeddings[1], torch.nn.functional.normalize(h, dim=0), rtol=1e-5, atol=1e-5)
    hits = r.search(TEXTS[3], 4)
    assert hits[0][0] == 3 and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    assert 3 not in [i for i, _ in r.search(TEXTS[3], 2, exclude={3})]
    # the cache is read back for the same texts and encoder, recomputed for another encoder or texts
    saved = torch.full_like(r.embeddings, 0.5)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(cache), framework="pt") as f:
        meta = f.metadata()
    save_file({"embeddings": saved}, str(cache), metadata=meta)  # marks what comes from the cache
    torch.testing.assert_close(
        DenseRetriever(TEXTS, encoder=(bert, tok), cache=cache, progress=False).embeddings, saved
    )
    other = DenseRetriever(TEXTS, encoder=(tiny_bert(seed=5, vocab=80), tok), cache=cache, progress=False)
    assert not torch.allclose(other.embeddings, saved)
    assert DenseRetriever(TEXTS[:2], encoder=(bert, tok), cache=cache, progress=False).embeddings.shape == (2, 24)
    with pytest.raises(ValueError, match="bm25"):
        build_retriever("tfidf", TEXTS)
