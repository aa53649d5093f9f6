"""Passage retrieval: BM25 (the `bm25s` library) and dense retrieval with MiniLM mean-pooled embeddings."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.bm25 import TOPK_BACKEND, import_bm25s


class BM25Retriever:
    """Lucene BM25 over `texts` (lower-cased, English stop words removed)."""

    def __init__(self, texts: list[str], k1: float = 1.5, b: float = 0.75):
        bm25s = import_bm25s()

        if not texts:
            raise ValueError("empty retrieval corpus")
        self._bm25s = bm25s
        self.texts = texts
        self.index = bm25s.BM25(k1=k1, b=b)
        self.index.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)

    def search(self, query: str, k: int, exclude: set[int] | None = None) -> list[tuple[int, float]]:
        """Top-k (passage index, score), best first; `exclude` passage indices never come back."""
        mask = None
        if exclude:
            mask = np.ones(len(self.texts), dtype=np.float32)
            mask[list(exclude)] = 0
        if k <= 0:
            return []
        # masked passages still come back (score 0): ask for enough to drop them
        n = min(len(self.texts), k + len(exclude or ()))
        q = self._bm25s.tokenize([query], stopwords="en", show_progress=False)
        docs, scores = self.index.retrieve(
            q, k=n, show_progress=False, weight_mask=mask, backend_selection=TOPK_BACKEND
        )
        hits = [(int(d), float(s)) for d, s in zip(docs[0], scores[0]) if not exclude or int(d) not in exclude]
        return hits[:k]


class DenseRetriever:
    """Cosine similarity of mean-pooled, L2-normalised encoder states (all-MiniLM-L6-v2 style).

    `encoder`: an asset name / folder (default `minilm-l6`) or an `(AutoModel, tokenizer)` pair.
    `cache`: optional safetensors file keeping the passage embeddings (keyed by a hash of the texts,
    the encoder's weights and the truncation length)."""

    def __init__(self, texts: list[str], encoder="minilm-l6", device: str = "cpu", batch_size: int = 64,
                 max_length: int = 256, cache: str | Path | None = None, progress: bool = True):
        if not texts:
            raise ValueError("empty retrieval corpus")
        if isinstance(encoder, (str, Path)):
            from ..model.loading import load_encoder

            module, self.tokenizer = load_encoder(str(encoder))
            self.model = module.model
        else:
            self.model, self.tokenizer = encoder
        self.model = self.model.to(device).eval()
        self.device, self.batch_size, self.max_length, self.progress = device, batch_size, max_length, progress
        self.texts = texts
        self.embeddings = self._load_or_embed(texts, cache)

    @torch.no_grad()
    def embed(self, texts: list[str], progress: bool = False) -> torch.Tensor:
        """(N, He) unit vectors."""
        out = []
        for i in tqdm(range(0, len(texts), self.batch_size), desc="embed passages", disable=not progress, leave=False):
            batch = self.tokenizer(texts[i : i + self.batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            states = self.model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"][..., None].float()
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
        return torch.cat(out)

    def _load_or_embed(self, texts: list[str], cache) -> torch.Tensor:
        from ..model import weights_fingerprint

        key = hashlib.sha256(
            "\x00".join([weights_fingerprint(self.model), str(self.max_length), *texts]).encode()
        ).hexdigest()
        if cache is not None and Path(cache).is_file():
            from safetensors import safe_open

            with safe_open(str(cache), framework="pt") as f:
                if (f.metadata() or {}).get("key") == key:
                    return f.get_tensor("embeddings")
        emb = self.embed(texts, progress=self.progress)
        if cache is not None:
            from safetensors.torch import save_file

            Path(cache).parent.mkdir(parents=True, exist_ok=True)
            save_file({"embeddings": emb.contiguous()}, str(cache), metadata={"key": key})
        return emb

    def search(self, query: str, k: int, exclude: set[int] | None = None) -> list[tuple[int, float]]:
        sims = self.embeddings @ self.embed([query])[0]
        if exclude:
            sims[list(exclude)] = float("-inf")
        k = min(k, len(self.texts) - len(exclude or ()))
        if k <= 0:
            return []
        top = torch.topk(sims, k)
        return [(int(i), float(s)) for i, s in zip(top.indices, top.values)]


def build_retriever(kind: str, texts: list[str], **kwargs):
    if kind == "bm25":
        return BM25Retriever(texts)
    if kind == "dense":
        return DenseRetriever(texts, **kwargs)
    raise ValueError(f"retriever must be 'bm25' or 'dense', got {kind!r}")
