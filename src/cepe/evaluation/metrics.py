"""Metrics: perplexity, and the open-domain QA answer metrics (SQuAD-style normalisation)."""

from __future__ import annotations

import math
import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_LEAD_IN = re.compile(r"^(the\s+)?(short\s+)?answer(\s+to\s+(this|the)\s+question)?(\s+is)?\s*:\s*", re.I)
_PUNCT = set(string.punctuation)


def perplexity(total_nll: float, num_tokens: int) -> float:
    """exp(mean negative log-likelihood); NaN when nothing was scored."""
    if num_tokens <= 0:
        return float("nan")
    return math.exp(total_nll / num_tokens)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, articles and extra whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def clean_answer(generated: str) -> str:
    """The answer in a generated continuation: its first non-empty line once a lead-in such as
    'The answer is:' is dropped (small instruct models like to announce, then answer below)."""
    for line in generated.strip().split("\n"):
        line = _LEAD_IN.sub("", line.strip()).strip()
        if line:
            return line
    return ""


def exact_match(prediction: str, answers: list[str]) -> float:
    """1.0 if the normalised prediction equals any normalised answer."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def f1_score(prediction: str, answers: list[str]) -> float:
    """Best token-overlap F1 over the answers."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for answer in answers:
        gold = normalize_answer(answer).split()
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            precision, recall = common / len(pred), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def substring_match(prediction: str, answers: list[str]) -> float:
    """1.0 if any normalised answer occurs in the normalised prediction (whole words)."""
    pred = f" {normalize_answer(prediction)} "
    return float(any(normalize_answer(a) and f" {normalize_answer(a)} " in pred for a in answers))


def accuracy(predictions: list, labels: list) -> float:
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        return float("nan")
    return sum(p == y for p, y in zip(predictions, labels)) / len(labels)


def first_integer(text: str) -> str | None:
    """The first run of digits in `text` (passkey answers)."""
    m = re.search(r"\d+", text)
    return m.group(0) if m else None
