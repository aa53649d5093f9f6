"""Helpers shared by the tasks."""

from __future__ import annotations

from typing import Any

from ..methods import Method


def encode(tokenizer: Any, text: str) -> list[int]:
    """Decoder ids of `text`, without special tokens (CEPE's convention)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def fit_documents(docs: list[list[int]], budget: int) -> list[list[int]]:
    """Keep the documents at the *end* of `docs` (the best ones, given best-last order) whose
    total length fits `budget` tokens."""
    kept, used = [], 0
    for doc in reversed(docs):
        if used + len(doc) > budget:
            break
        kept.append(doc)
        used += len(doc)
    return kept[::-1]


def window_budget(method: Method, used: int) -> int | float:
    """Tokens left for context in the window of a method that puts context there."""
    limit = getattr(method, "max_length", None)
    return float("inf") if limit is None else limit - used


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
