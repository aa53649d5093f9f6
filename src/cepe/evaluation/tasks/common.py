"""Helpers shared by the tasks."""

from __future__ import annotations

from typing import Any

import torch

from ..methods import Full, Method, StreamingLLM
from ..metrics import perplexity
from ..scoring import Request


def encode(tokenizer: Any, text: str) -> list[int]:
    """Decoder ids of `text`, without special tokens (CEPE's convention)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stop_ids(tokenizer: Any, newline: bool = True) -> set[int]:
    """Tokens that end a short answer: end of sequence / turn, and a lone newline token."""
    eos = getattr(tokenizer, "eos_token_id", None)
    out = {eos} if isinstance(eos, int) else set()
    for special in ("<|im_end|>", "<|endoftext|>"):
        ids = encode(tokenizer, special)
        if len(ids) == 1 and special in getattr(tokenizer, "all_special_tokens", []):
            out.add(ids[0])
    if newline:
        ids = encode(tokenizer, "\n")
        if len(ids) == 1:
            out.add(ids[0])
    return out


def window_request(prefix: list[int], body: list[int], decoder_tokens: int) -> Request:
    """A long prompt laid out like a `ppl` window: the last D tokens of `body` (they end with the
    question) in the decoder, everything before them as one context document; `prefix` (the
    instruction) stays in every method's decoder."""
    d = min(decoder_tokens, len(body))
    context = [body[:-d]] if len(body) > d else []
    return Request(tokens=body[-d:], context=context, prefix=prefix, score_start=1)


def fitting_prefix(docs: list[list[int]], budget: float) -> list[list[int]]:
    """The longest run of `docs` from the front whose total length fits `budget` tokens."""
    kept, used = [], 0
    for doc in docs:
        if used + len(doc) > budget:
            break
        kept.append(doc)
        used += len(doc)
    return kept


def window_budget(method: Method, used: int) -> float:
    """Tokens of context `method` can still place in its window when `used` are taken."""
    return getattr(method, "max_length", float("inf")) - used


def in_window(method: Method) -> bool:
    """Methods that read the context inside the decoder's own window."""
    return isinstance(method, (Full, StreamingLLM))


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


class NllTable:
    """Accumulates scored log-likelihoods per (method, setting) into perplexities."""

    def __init__(self):
        self.cells: dict[str, dict] = {}

    def add(self, method: str, key, logliks: torch.Tensor) -> None:
        cell = self.cells.setdefault(method, {}).setdefault(key, {"nll": 0.0, "tokens": 0, "window_nll": []})
        nll = -float(logliks.sum())
        cell["nll"] += nll
        cell["tokens"] += logliks.numel()
        cell["window_nll"].append(round(nll / max(1, logliks.numel()), 5))

    def summary(self, method: str, key) -> dict:
        cell = self.cells.get(method, {}).get(key, {"nll": 0.0, "tokens": 0, "window_nll": []})
        return {
            "ppl": perplexity(cell["nll"], cell["tokens"]),
            "nll": cell["nll"] / cell["tokens"] if cell["tokens"] else None,
            "tokens": cell["tokens"],
            "window_nll": cell["window_nll"],
        }


def score_window(name: str, method: Method, request, done: dict, timer, not_fit: dict, setting):
    """`score(method, request)`, timed; reused from `done` for methods that ignore the context
    (the same window scores the same for every setting); None (noted in `not_fit`) when the
    method cannot read the request."""
    from ..methods import DoesNotFit
    from ..scoring import score

    if not method.reads_context and name in done:
        return done[name]
    try:
        with timer(name):
            done[name] = score(method, request)
    except DoesNotFit:
        not_fit.setdefault(name, []).append(setting)
        return None
    return done[name]


def tokenized_docs(paths, text_key, tokenizer, max_docs, same_as=None) -> list[tuple[str, list[int]]]:
    """(name, ids) per document. `same_as`: documents already read (e.g. rag-lm's scored ones); a
    document here that is one of them, reached through another path, takes its name, and one that
    only shares a name gets its full path, so that names mean "the same file" (rag-lm leaves a
    scored document's own passages out by name)."""
    from ..data import load_documents

    docs = load_documents(paths, text_key, max_docs)
    if same_as:
        by_source = {d.source: d.name for d in same_as}
        for d in docs:
            d.name = by_source.get(d.source) or (d.source if d.name in by_source.values() else d.name)
    return [(d.name, encode(tokenizer, d.text)) for d in docs]


def check_paths(paths) -> None:
    """Raise on a missing or empty input (before a slow model load)."""
    from ..data import text_files

    for p in paths:
        text_files(p)
