"""Retrieval-augmented language modeling: perplexity of the last W tokens of a D-token window
when k passages retrieved for the window go to the encoder (CEPE), the decoder's window
(`full`: as many as fit, best nearest the window), or one REPLUG pass each.

The query is the window's unscored first D - W tokens (what the model has read before the
scored tokens); passages from the scored document itself are excluded by default.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from ..methods import Method
from ..report import Timer
from ..scoring import Request
from .common import NllTable, fitting_prefix, in_window, score_window, window_budget
from .ppl import window_ends


@dataclass
class RagSettings:
    decoder_tokens: int = 512
    scored_tokens: int = 256
    ks: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 8, 16])
    windows_per_doc: int = 1
    exclude_same_source: bool = True

    def __post_init__(self):
        if not 1 <= self.scored_tokens < self.decoder_tokens:
            raise ValueError(f"scored tokens W={self.scored_tokens} must be in [1, D={self.decoder_tokens})")
        if not self.ks or min(self.ks) < 0:
            raise ValueError(f"k must be >= 0, got {self.ks}")
        self.ks = sorted(set(self.ks))


@dataclass
class Passage:
    source: str
    ids: list[int]
    text: str


def make_passages(docs: list[tuple[str, list[int]]], tokenizer: Any, passage_tokens: int) -> list[Passage]:
    """Cut each (name, ids) document into consecutive passages of `passage_tokens` decoder tokens."""
    if passage_tokens < 1:
        raise ValueError(f"passage tokens must be positive, got {passage_tokens}")
    out = []
    for name, ids in docs:
        for i in range(0, len(ids), passage_tokens):
            piece = ids[i : i + passage_tokens]
            out.append(Passage(name, piece, tokenizer.decode(piece)))
    return out


def make_request(method: Method, window: list[int], passages: list[list[int]], scores: list[float],
                 s: RagSettings) -> tuple[Request, int]:
    """The request `method` reads, and how many passages it got. Passages come best first."""
    score_start = s.decoder_tokens - s.scored_tokens
    if in_window(method):
        kept = fitting_prefix(passages, window_budget(method, len(window)))
        # best passage nearest the scored window
        return Request(tokens=window, context=kept[::-1], score_start=score_start), len(kept)
    return Request(tokens=window, context=passages, weights=scores, score_start=score_start), len(passages)


def run(methods: dict[str, Method], docs: list[tuple[str, list[int]]], passages: list[Passage], retriever,
        s: RagSettings, tokenizer: Any, timer: Timer | None = None, progress: bool = True) -> dict:
    timer = timer or Timer()
    d, w = s.decoder_tokens, s.scored_tokens
    windows = [(name, ids, end) for name, ids in docs for end in window_ends(len(ids), d, s.windows_per_doc)]
    if not windows:
        raise ValueError(f"no document has the D={d} tokens a window needs")
    by_source = defaultdict(set)
    for i, p in enumerate(passages):
        by_source[p.source].add(i)
    table, not_fit, used = NllTable(), {}, defaultdict(list)
    retrieved = []
    bar = tqdm(total=len(windows) * len(s.ks) * len(methods), desc="rag-lm", disable=not progress)
    for doc_name, ids, end in windows:
        window = ids[end - d : end]
        with timer("retrieval"):
            hits = retriever.search(tokenizer.decode(window[: d - w]), max(s.ks),
                                    exclude=by_source[doc_name] if s.exclude_same_source else None)
        retrieved.append(
            {"document": doc_name, "end": end, "passages": [(i, round(sc, 3), passages[i].source) for i, sc in hits]}
        )
        done: dict = {}
        for k in s.ks:
            top = hits[:k]
            texts = [passages[i].ids for i, _ in top]
            for name, method in methods.items():
                bar.set_postfix_str(f"{name} k={k}")
                req, n_used = make_request(method, window, texts, [sc for _, sc in top], s)
                lp = score_window(name, method, req, done, timer, not_fit, k)
                if lp is not None:
                    table.add(name, k, lp)
                    used[(name, k)].append(n_used if method.reads_context else 0)
                bar.update()
    bar.close()
    results = {
        name: {str(k): {"k": k, "passages_read": _avg(used[(name, k)]), **table.summary(name, k)} for k in s.ks}
        for name in methods
    }
    return {"methods": results, "windows": retrieved, "does_not_fit": {k: sorted(set(v)) for k, v in not_fit.items()},
            "corpus_passages": len(passages)}


def _avg(values: list[int]) -> float | None:
    return sum(values) / len(values) if values else None


def table(result: dict, s: RagSettings) -> tuple[list[str], list[list]]:
    header = ["method \\ k passages"] + [str(k) for k in s.ks]
    rows = [[name] + [result["methods"][name][str(k)]["ppl"] for k in s.ks] for name in result["methods"]]
    return header, rows
