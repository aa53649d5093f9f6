"""Retrieval-style samples (the paper's retrieval stage): the encoder reads passages that BM25
finds for the decoder's text, from other documents, of the same source where possible."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..bm25 import TOPK_BACKEND, import_bm25s
from ..config import DataConfig
from ..samples import Corpus, TooShort, _WindowBuilder
from .text import source_of


class PassagePool:
    """Passages of `passage_tokens` decoder tokens cut from the training documents, indexed by
    BM25 (bm25s) over their text; each passage remembers its document and source."""

    def __init__(self, corpus: Corpus, cfg: DataConfig, decode: Callable[[list[int]], str]):
        bm25s = import_bm25s()

        size = cfg.retrieval.passage_tokens
        spans = [(int(d), s) for d in corpus.docs for s in range(0, corpus.decoder.doc_len(int(d)) - size + 1, size)]
        if not spans:
            raise TooShort(f"no document holds a {size}-token passage for the retrieval pool")
        rng = np.random.default_rng([cfg.seed, 7])
        if len(spans) > cfg.retrieval.max_passages:
            keep = np.sort(rng.choice(len(spans), size=cfg.retrieval.max_passages, replace=False))
            spans = [spans[i] for i in keep]
        self.corpus, self.size, self.decode = corpus, size, decode
        self.spans = np.asarray(spans, dtype=np.int64)  # (P, 2): doc, first decoder token
        names = corpus.decoder.names
        sources = sorted({source_of(names[int(d)]) for d in corpus.docs})
        self.source_ids = {s: i for i, s in enumerate(sources)}
        self.passage_source = np.array(
            [self.source_ids[source_of(names[int(d)])] for d in self.spans[:, 0]], dtype=np.int64
        )
        texts = [decode(self.decoder_tokens(i).tolist()) for i in range(len(self.spans))]
        self.bm25 = bm25s.BM25()
        self.bm25.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)

    def __len__(self) -> int:
        return len(self.spans)

    def decoder_tokens(self, i: int) -> np.ndarray:
        doc, s = self.spans[i]
        return np.asarray(self.corpus.decoder.doc_tokens(int(doc))[s : s + self.size], dtype=np.int64)

    def encoder_tokens(self, i: int) -> np.ndarray:
        doc, s = (int(x) for x in self.spans[i])
        dec = self.corpus.decoder
        return self.corpus.encoder_span(doc, dec.char_start(doc, s), dec.char_start(doc, s + self.size))

    def search(self, query: str, k: int, exclude_doc: int, source: str | None = None) -> list[int]:
        """Top-k passages for `query`, none from `exclude_doc` (that would leak the answer);
        with `source`, only passages of that source (fewer than k if it has fewer)."""
        tokens = import_bm25s().tokenize([query], stopwords="en", show_progress=False)
        allowed = self.spans[:, 0] != exclude_doc
        if source is not None:
            allowed &= self.passage_source == self.source_ids.get(source, -1)
            if not allowed.any():
                return []
            n = min(len(self), k)
            ids, _ = self.bm25.retrieve(tokens, k=n, weight_mask=allowed.astype(np.float32), show_progress=False,
                                        backend_selection=TOPK_BACKEND)
            # a zero score is a masked passage (or one sharing no word): keep allowed ones only
            return [int(i) for i in ids[0] if allowed[int(i)]][:k]
        n = min(len(self), k + 16)
        ids, _ = self.bm25.retrieve(tokens, k=n, show_progress=False, backend_selection=TOPK_BACKEND)
        return [int(i) for i in ids[0] if allowed[int(i)]][:k]


class RetrievalBuilder(_WindowBuilder):
    """The encoder reads the k passages BM25 retrieves for the decoder's text (from other
    documents; with `data.retrieval.scope=same_source`, other documents of the same source)."""

    kind = "retrieval"

    def __init__(self, corpus: Corpus, cfg: DataConfig, pool: PassagePool, teacher_tokens: int = 0):
        self.pool = pool
        super().__init__(corpus, cfg, teacher_tokens)

    def sample(self, rng: np.random.Generator, d: int | None = None) -> dict[str, Any]:
        return self.retrieve(rng, d)[0]

    def retrieve(self, rng: np.random.Generator, d: int | None = None) -> tuple[dict[str, Any], list[int]]:
        """A window and the passages retrieved for it -> (the sample, the passages' pool indices)."""
        d = self.fit(d or self.D)
        doc, p = self.pick_window(rng, d)
        out = self.window(doc, p, d)
        query, k = self.pool.decode(out["input_ids"].tolist()), self.cfg.retrieval.k
        if not isinstance(k, int):  # a range: drawn only then, so a fixed k draws as before
            k = int(rng.integers(k[0], k[1] + 1))
        hits = []
        if self.cfg.retrieval.scope == "same_source":
            hits = self.pool.search(query, k, exclude_doc=doc, source=source_of(self.corpus.decoder.names[doc]))
        if not hits:
            hits = self.pool.search(query, k, exclude_doc=doc)
        # the teacher reads the passages' text (its tail) before the window
        prefix = np.concatenate([self.pool.decoder_tokens(i) for i in hits]) if hits else np.zeros(0, np.int64)
        prefix = prefix[max(0, len(prefix) - self.teacher_tokens) :]
        return {**out, "context": [self.pool.encoder_tokens(i) for i in hits], "teacher_prefix": prefix}, hits
