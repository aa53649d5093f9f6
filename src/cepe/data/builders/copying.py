"""Copying and lookup through the encoder: after a long-document window the decoder must reproduce
text that only the context holds. Everything copied is real text of the mix.

Three formats, one drawn per sample:
    continue  a span of the context, cued by its first few tokens (loss on the rest of the span)
    lookup    records the context's text already holds (`key = value`, `key: value`, `def f(...)`)
              or, where it has none, the words that follow a word seen once in the context
    table     records built from the context's words (a word -> the words after it), rendered as a
              Markdown table, config lines, JSON, dictionary entries or tab-separated values, in a
              context document of their own; queried in that format or with a question
The decoder reads D tokens: the window's first D - T tokens (loss on them, as in `long_document`)
then the task (T tokens at most `copying.task_tokens`; loss on the copied tokens only). A copied
answer never occurs in the decoder's tokens before it (checked; else a plain long-document sample).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from ..config import DataConfig
from ..samples import Corpus, LongDocumentBuilder
from .text import TextCodec, one_line

CONTINUE_CUES = ('\n\nQuoting the passage above: "', "\n\nAs it was written earlier:\n", "\n\n> ", "\n\n[repeated] ",
                 "\n\nThe text said: ")
LOOKUP_CUES = (
    "\n\nFrom the text above:\n",
    "\n\nLooked up in the context:\n",
    "\n\n# values defined earlier\n",
    "\n\n",
)
RECORD = re.compile(r"^[ \t]*(?:def |class |function |fn |func |let |const |var |export |set )?"
                    r"([A-Za-z_][\w.\-]{1,40})[ \t]*(=|:|->|\()[ \t]*(\S[^\n]{2,80}?)[ \t]*$", re.MULTILINE)
WORD = re.compile(r"\b[A-Za-z][A-Za-z'-]{3,24}\b")
# (header, row, query prompt) per rendering of a synthesised table; {k} key, {v} value
TABLES = (
    ("| term | what follows |\n|---|---|\n", "| {k} | {v} |\n", "| {k} | "),
    ("[records]\n", "{k} = {v}\n", "{k} = "),
    ("{{\n", '  "{k}": "{v}",\n', '"{k}": "'),
    ("GLOSSARY\n\n", "{K}, n. {v}.\n", "{K}, n. "),
    ("key\tvalue\n", "{k}\t{v}\n", "{k}\t"),
)
QUESTION = "Q: In the table, what is listed for {k}?\nA: "


# a scored segment that marks where an answer ends (the tail's first token): weighted like the
# answer, but not required to be absent from the text before it
ANSWER_END = "end"


class AnswerTail:
    """Ends a window with a task: its head kept, then cue, questions (no loss), answers (scored) and
    where each answer ends. Needs `self.codec`; shared by the builders whose answers the encoder holds."""

    codec: TextCodec

    def _assemble(self, ids: np.ndarray, segments: list[tuple[np.ndarray, bool | str]]) -> dict | None:
        """Window head + task segments (ids, scored) -> input_ids/labels of len(ids) and task_mask
        (True on the answers' tokens), or None if an answer already occurs in the decoder's text
        before it."""
        task = sum(len(s) for s, _ in segments)
        keep = len(ids) - task
        if task == 0 or keep < 1:
            return None
        parts, labels, task = [ids[:keep]], [ids[:keep]], [np.zeros(keep, dtype=bool)]
        for seg, scored in segments:
            if scored is True:  # an answer (its end marker is scored, not checked)
                answer = self.codec.decode(seg).strip()
                if len(answer) < 2 or answer in self.codec.decode(np.concatenate(parts)):
                    return None
            parts.append(seg)
            labels.append(seg if scored else np.full(len(seg), -100, dtype=np.int64))
            task.append(np.full(len(seg), bool(scored), dtype=bool))
        return {"input_ids": np.concatenate(parts).astype(np.int64), "labels": np.concatenate(labels).astype(np.int64),
                "task_mask": np.concatenate(task)}

    def _qa_segments(self, cue: str, items, budget: int) -> list[tuple[np.ndarray, bool | str]] | None:
        """Cue, then per (question, answer, tail) of `items`: the question unscored, the answer and
        the tail's first token scored (where the answer ends: without it a model learns to copy a
        value but not to stop, "48844" -> "4884444"), the rest of the tail unscored, while the
        task's tokens fit `budget`; None if not one does."""
        segments = [(self.codec.dec(cue), False)]
        used = len(segments[0][0])
        for question, answer, tail in items:
            q, a, t = self.codec.dec(question), self.codec.dec(answer), self.codec.dec(tail)
            if used + len(q) + len(a) + len(t) > budget:
                break
            segments += [(q, False), (a, True), (t[:1], ANSWER_END), (t[1:], False)]
            used += len(q) + len(a) + len(t)
        return segments if len(segments) > 1 else None


class CopyingBuilder(AnswerTail, LongDocumentBuilder):
    """Long-document windows ending in a copy or lookup task whose answer only the context holds."""

    kind = "copying"
    FORMATS = ("continue", "lookup", "table")

    def __init__(self, corpus: Corpus, cfg: DataConfig, codec: TextCodec, teacher_tokens: int = 0):
        self.codec = codec
        super().__init__(corpus, cfg, teacher_tokens)

    def sample(self, rng: np.random.Generator, d: int | None = None, context_q: float | None = None) -> dict[str, Any]:
        base = super().sample(rng, d, context_q)
        ids, (context,) = base["input_ids"], base["context"]
        budget = min(self.cfg.copying.task_tokens, len(ids) // 2)
        ctx_ids = self._context_decoder_tokens(base["doc"], base["position"], len(context))
        for _ in range(3):  # a draw whose answer the window happens to hold is redrawn
            fmt = self.FORMATS[int(rng.integers(len(self.FORMATS)))]
            task = getattr(self, f"_{fmt}")(rng, ctx_ids, budget)
            if task is None or task[0] is None:
                continue
            segments, extra = task
            out = self._assemble(ids, segments)
            if out is not None:
                base.update(out, copy_format=fmt)
                if extra:
                    base["context"] = [context, self.codec.enc(extra)]
                return base
        return base  # too little context for any task: a plain long-document sample

    # ------------------------------------------------------------------ pieces
    def _context_decoder_tokens(self, doc: int, p: int, n_context: int) -> np.ndarray:
        """Decoder tokens of the context's text (the encoder's last n tokens before position p)."""
        enc, dec = self.corpus.encoder, self.corpus.decoder
        b = enc.tokens_before(doc, dec.char_start(doc, p))
        lo_char = int(enc.doc_ends(doc)[b - n_context - 1]) if b - n_context > 0 else 0
        # the first decoder token wholly inside the context's text
        q = dec.tokens_before(doc, lo_char) + (1 if b - n_context > 0 else 0)
        return self.corpus.decoder_tokens(doc, min(q, p), p)

    def _continue(self, rng: np.random.Generator, ctx: np.ndarray, budget: int):
        lo, hi = self.cfg.copying.span_tokens
        cue = self.codec.dec(CONTINUE_CUES[int(rng.integers(len(CONTINUE_CUES)))])
        k = int(rng.integers(3, 9))  # tokens of the span given as its cue
        span = min(int(rng.integers(lo, hi + 1)), budget - len(cue) - k)
        if span < 2 or len(ctx) < span + k + 1:
            return None
        s = int(rng.integers(len(ctx) - span - k + 1))
        return [(cue, False), (ctx[s : s + k], False), (ctx[s + k : s + k + span], True)], None

    def _queries(
        self, rng: np.random.Generator, pairs: list[tuple[str, str]], prompt, budget: int, cue: str, tail: str = "\n"
    ):
        """Cue, then `prompt(key)` (no loss) + value (loss) + `tail` (the rest of the line), for
        `copying.queries` random pairs, while they fit."""
        lo, hi = self.cfg.copying.queries
        picked = rng.permutation(len(pairs))[: int(rng.integers(lo, hi + 1))]
        return self._qa_segments(cue, ((prompt(pairs[int(i)][0]), pairs[int(i)][1], tail) for i in picked), budget)

    def _lookup(self, rng: np.random.Generator, ctx: np.ndarray, budget: int):
        text = self.codec.decode(ctx)
        found: dict[str, list[tuple[str, str]]] = {}
        for m in RECORD.finditer(text):
            found.setdefault(m.group(1), []).append((m.group(2), m.group(3)))
        values = [v for recs in found.values() for _, v in recs]
        # a key defined once, with a value stated once: the answer is determined by the context
        records = [(k, recs[0]) for k, recs in found.items() if len(recs) == 1 and values.count(recs[0][1]) == 1]
        cue = LOOKUP_CUES[int(rng.integers(len(LOOKUP_CUES)))]
        if records:
            seps = dict(records)
            pairs = [(k, v) for k, (_, v) in records]
            prompt = lambda k: f"{k} {seps[k][0]} " if seps[k][0] != "(" else f"{k}("  # noqa: E731
            return self._queries(rng, pairs, prompt, budget, cue), None
        pairs = self._followers(rng, text, once=True)
        if not pairs:
            return None
        return self._queries(rng, pairs, lambda k: f'"{k}" is followed by:', budget, cue), None

    def _followers(self, rng: np.random.Generator, text: str, once: bool, limit: int = 64) -> list[tuple[str, str]]:
        """(word, the 1-5 words after it) for words of `text` (with `once`, words seen once only)."""
        words = WORD.findall(text)
        counts: dict[str, int] = {}
        for w in words:
            counts[w] = counts.get(w, 0) + 1
        pool = sorted(w for w, c in counts.items() if c == 1 or not once)
        pairs, seen = [], set()
        for i in rng.permutation(len(pool))[: 4 * limit]:
            w = pool[int(i)]
            m = re.search(rf"\b{re.escape(w)}\b((?:[ \t]+[\w'-]+){{{int(rng.integers(1, 6))}}})", text)
            if m and one_line(m.group(1)) not in seen:
                seen.add(one_line(m.group(1)))
                pairs.append((w, one_line(m.group(1))))
            if len(pairs) >= limit:
                break
        return pairs

    def _table(self, rng: np.random.Generator, ctx: np.ndarray, budget: int):
        lo, hi = self.cfg.copying.records
        pairs = self._followers(rng, self.codec.decode(ctx), once=False, limit=int(rng.integers(lo, hi + 1)))
        if not pairs:
            return None
        header, row, prompt = TABLES[int(rng.integers(len(TABLES)))]
        table = header.format() + "".join(row.format(k=k, K=k.upper(), v=v) for k, v in pairs)
        if rng.random() < 0.5:
            ask, tail = (lambda k: QUESTION.format(k=k)), "\n"
        else:  # the table's own row: its prompt, the value, the rest of the row
            ask, tail = (lambda k: prompt.format(k=k, K=k.upper())), row.split("{v}")[1]
        segments = self._queries(rng, pairs, ask, budget, "\n\n", tail)
        return (segments, table) if segments else None
