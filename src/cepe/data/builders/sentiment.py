"""Sentiment labels for demonstration snippets, from the VADER lexicon (Hutto and Gilbert, 2014).

The mix holds no labelled sentiment, and the ICL sets are the evaluation, so nothing labelled may be
trained on. Labels naming a document's topic or source can be matched by topic alone (an example
and its label share words with the context's examples of that label); a label that is a property of
the words' tone cannot, so the decoder must pair inputs with labels through the context. With
category and source labels only, the adapter answered nearly every sentiment and intent input with
one label (soup22: docs/results_general_stage21.md).
"""

from __future__ import annotations

from functools import lru_cache

CLASSES = ("positive", "negative", "neutral", "mixed")
# names a sample shows for CLASSES, one naming drawn per sample: no one word per class becomes the
# answer, and the evaluation sets' own label words are not among them
NAMINGS = (
    ("positive", "negative", "neutral", "mixed"),
    ("good", "bad", "neutral", "mixed"),
    ("pos", "neg", "none", "both"),
    ("favourable", "unfavourable", "plain", "conflicted"),
)
PROSE = 0.8  # share of a snippet's words that must be alphabetic: code would make "neutral" mean "code"


@lru_cache(maxsize=1)
def _analyzer():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as e:  # a core dependency; only a broken install lacks it
        raise ImportError("data.demonstrations.labels 'sentiment' needs the vaderSentiment package "
                          "(pip install vaderSentiment)") from e
    return SentimentIntensityAnalyzer()


def is_prose(text: str) -> bool:
    words = text.split()
    alpha = sum(w.strip(".,;:!?\"'()-").isalpha() for w in words)
    return len(words) >= 5 and alpha >= PROSE * len(words)


def sentiment_of(text: str) -> str | None:
    """One of CLASSES, or None where the tone is unclear (weak, or leaning one way with a little of
    the other); only clear cases become labelled examples. None for text that is not prose."""
    if not is_prose(text):
        return None
    s = _analyzer().polarity_scores(text)
    pos, neg, compound = s["pos"], s["neg"], s["compound"]
    if pos >= 0.15 and neg >= 0.15:
        return "mixed"
    if compound >= 0.6 and neg == 0:
        return "positive"
    if compound <= -0.6 and pos == 0:
        return "negative"
    if pos == 0 and neg == 0:
        return "neutral"
    return None


def group_by_sentiment(texts: list[str], min_size: int = 4) -> dict[str, list[str]]:
    """The texts of clear tone, by class; classes with fewer than `min_size` texts are left out."""
    groups: dict[str, list[str]] = {c: [] for c in CLASSES}
    for t in texts:
        label = sentiment_of(t)
        if label is not None:
            groups[label].append(t)
    return {c: g for c, g in groups.items() if len(g) >= min_size}
