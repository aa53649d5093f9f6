"""Questions over retrieved passages: the encoder reads the k passages BM25 finds for the window
(as in `retrieval`), and after the window the decoder is asked to fill a blank in a sentence of one
of them; the answer (a number, a name, or a rarer word) is scored, then where it ends.

This is open-domain QA's skill without QA data: find, among many passages, the one a question's
words point to, and copy the short span it asks for. The sentence is quoted with its answer blanked,
so only the encoder's passages determine the answer; it never occurs in the window before it.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from ..config import DataConfig
from ..samples import Corpus
from .copying import AnswerTail
from .retrieval import PassagePool, RetrievalBuilder
from .text import TextCodec, one_line

BLANK = "____"
QUESTIONS = (
    'Question: What fills the blank in "{s}"?\nAnswer:',
    "Q: {s}\nWhat goes in the blank?\nA:",
    "Fill in the blank from the documents: {s}\nAnswer:",
    "According to the passages, {s} What is missing?\nAnswer:",
)
SENTENCE = re.compile(r"[^.!?\n]{30,240}[.!?]")
# answer candidates of three kinds: numbers, capitalised names (not the sentence's first word),
# longer lower-case words
CANDIDATES = (
    re.compile(r"(?<![\w.,])\d[\d,.:/-]*\d(?![\w])"),
    re.compile(r"(?<=[a-z,;] )[A-Z][a-z]+(?: [A-Z][a-z]+){0,3}\b"),
    re.compile(r"(?<= )[a-z]{7,20}\b"),
)


class PassageQABuilder(AnswerTail, RetrievalBuilder):
    """Retrieval windows ending in cloze questions about one of the passages the encoder reads."""

    kind = "passage_qa"

    def __init__(self, corpus: Corpus, cfg: DataConfig, codec: TextCodec, pool: PassagePool, teacher_tokens: int = 0):
        self.codec = codec
        super().__init__(corpus, cfg, pool, teacher_tokens)

    def sample(self, rng: np.random.Generator, d: int | None = None) -> dict[str, Any]:
        base, hits = self.retrieve(rng, d)
        ids, first, passage = base["input_ids"], None, None
        share = self.cfg.retrieval.in_window
        if share > 0 and len(hits) > 1 and rng.random() < share:  # no draw at 0: samples as before
            passage = np.concatenate([self.codec.dec("\n\n"), self.pool.decoder_tokens(hits[0])])
            if len(ids) - len(passage) < 64 + min(self.cfg.copying.task_tokens, len(ids) // 4):
                passage = None  # a window too short to hold the passage, text and questions
            else:  # the top passage moves from the encoder into the window, just before the questions
                ids, first = ids[: len(ids) - len(passage)], 0 if rng.random() < 0.5 else None
        budget = min(self.cfg.copying.task_tokens, len(ids) // 2)
        texts = [self.pool.decode(self.pool.decoder_tokens(i).tolist()) for i in hits]
        for _ in range(3):  # a draw whose answer the window happens to hold is redrawn
            qa = _cloze(rng, texts, n=int(rng.integers(1, 3)), first=first)
            segments = self._qa_segments("\n\n", ((q, " " + a, ".\n") for q, a in qa), budget) if qa else None
            out = self._assemble(ids, segments) if segments else None  # checks the window's own text only
            if out is not None and passage is not None:
                out = _insert(out, len(ids) - sum(len(seg) for seg, _ in segments), passage)
                return {**base, **out, "context": base["context"][1:], "copy_format": "passage_qa_in_window"}
            if out is not None:
                return {**base, **out, "copy_format": "passage_qa"}
        return base


def _insert(out: dict[str, np.ndarray], at: int, passage: np.ndarray) -> dict[str, np.ndarray]:
    """The passage's tokens put into a sample's input_ids / labels / task_mask at `at`; the
    passage is read as text (its tokens are labelled, not an answer)."""
    fill = {"input_ids": passage, "labels": passage, "task_mask": np.zeros(len(passage), dtype=bool)}
    return {k: np.concatenate([v[:at], fill[k].astype(v.dtype), v[at:]]) for k, v in out.items()}


def _cloze(rng: np.random.Generator, texts: list[str], n: int, first: int | None = None) -> list[tuple[str, str]]:
    """Up to n (question, answer) pairs, from n different passages (passage `first` tried first): a
    sentence of the passage with one span blanked; the span occurs once in the sentence, and the
    sentence once in all passages."""
    everything = one_line("\n".join(texts))
    out: list[tuple[str, str]] = []
    order = [int(i) for i in rng.permutation(len(texts))]
    if first is not None:
        order = [first] + [i for i in order if i != first]
    for i in order:
        sentences = [one_line(m.group(0)) for m in SENTENCE.finditer(texts[i])]
        for j in rng.permutation(len(sentences)):
            s = sentences[int(j)]
            kinds = [found for pattern in CANDIDATES
                     if (found := [m.group(0) for m in pattern.finditer(s) if s.count(m.group(0)) == 1])]
            if kinds and everything.count(s) == 1:
                spans = kinds[int(rng.integers(len(kinds)))]  # a number, a name or a word, as the sentence has
                answer = spans[int(rng.integers(len(spans)))]
                question = QUESTIONS[int(rng.integers(len(QUESTIONS)))]
                out.append((question.format(s=s.replace(answer, BLANK)), answer))
                break
        if len(out) == n:
            break
    return out
