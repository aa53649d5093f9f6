"""Demonstration-style samples (in-context learning through the encoder): labelled examples built
from the mix (a text snippet -> the category or the source it comes from) listed in the context,
a few more in the decoder after a window of ordinary text; loss on the decoder's labels.

With probability `renamed_labels` the labels are made-up words (redrawn per sample), so the
label of a decoder example can be learnt only from the context's examples. Never built from the
ICL evaluation sets: labels come from the training documents' names, or (`sentiment`) from a
lexicon's reading of the snippet (`cepe.data.builders.sentiment`).
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

import numpy as np

from ..config import DataConfig
from ..samples import Corpus, TooShort, _WindowBuilder
from .sentiment import CLASSES, NAMINGS, group_by_sentiment
from .text import TextCodec, category_of, one_line, source_of

# Renamed labels are made-up words, drawn fresh per sample: a fixed list of 30 real words became
# answers of their own (stage 6 answered "quartz." to a pass-key question), and made-up words carry
# no meaning and almost never occur in the window's text.
CONSONANTS, VOWELS, CODAS = "bdfgklmnprstvz", "aeiou", ("", "", "", "n", "r", "l", "s")


def label_words(rng: np.random.Generator, n: int) -> list[str]:
    """n distinct made-up words of 2-3 consonant-vowel syllables (e.g. "tomadi", "velus")."""
    words: list[str] = []
    while len(words) < n:
        k = int(rng.integers(2, 4))
        w = "".join(CONSONANTS[int(rng.integers(len(CONSONANTS)))] + VOWELS[int(rng.integers(len(VOWELS)))]
                    for _ in range(k)) + CODAS[int(rng.integers(len(CODAS)))]
        if w not in words:
            words.append(w)
    return words


# line templates: {x} text, {y} label, {ask} a question naming what the label is (ASK)
TEMPLATES = (
    "Text: {x}\nLabel: {y}\n\n",
    "Input: {x}\nOutput: {y}\n\n",
    "{x} => {y}\n",
    "Passage: {x}\n{ask} {y}\n\n",
    '"{x}" ({y})\n',
)
ASK = {"category": "Which category is it from?", "source": "Which source is it from?", "sentiment": "What is its tone?"}
LABELLERS = {"category": category_of, "source": lambda name: PurePosixPath(source_of(name)).stem}
SNIPPET_LABELS = ("sentiment",)  # labels read from a snippet's text, not its document's name


class DemonstrationsBuilder(_WindowBuilder):
    """Labelled examples in the context; a window of text then a few labelled examples in the
    decoder (the last ones scored on their labels)."""

    kind = "demonstrations"

    def __init__(self, corpus: Corpus, cfg: DataConfig, codec: TextCodec, teacher_tokens: int = 0):
        self.codec, self.dcfg = codec, cfg.demonstrations
        super().__init__(corpus, cfg, teacher_tokens)
        lens = corpus.decoder.doc_lens()
        need = self.dcfg.example_tokens[1] + 1
        names = corpus.decoder.names
        usable = [int(d) for d in corpus.docs if lens[int(d)] >= need]  # long enough for any example
        # per label kind: the class names and, per class, its documents (labelled by name) or its
        # snippets (labelled by their text)
        self.labels: dict[str, tuple[list[str], list[np.ndarray] | list[list[str]]]] = {}
        for what in self.dcfg.labels:
            if what in SNIPPET_LABELS:
                cats = set(self.dcfg.sentiment_categories)
                docs = [d for d in usable if not cats or category_of(names[d]) in cats]
                self._add_sentiment(np.asarray(docs, dtype=np.int64))
                continue
            if what not in LABELLERS:
                raise ValueError(f"data.demonstrations.labels: unknown {what!r} "
                                 f"(known: {sorted(LABELLERS) + list(SNIPPET_LABELS)})")
            groups: dict[str, list[int]] = {}
            for d in usable:
                groups.setdefault(LABELLERS[what](names[d]), []).append(d)
            if len(groups) >= 2:
                keys = sorted(groups)
                self.labels[what] = (keys, [np.asarray(groups[k]) for k in keys])
        if not self.labels:
            raise TooShort(f"the demonstrations builder needs documents of at least 2 {' or '.join(self.dcfg.labels)} "
                           f"values with {need} decoder tokens each")
        self.kinds = sorted(self.labels)

    def _add_sentiment(self, docs: np.ndarray) -> None:
        """A fixed pool of snippets (drawn with the data seed from `docs`) grouped by tone; the
        kind is kept when at least two classes have examples."""
        if len(docs) == 0:
            return
        rng = np.random.default_rng([self.cfg.seed, 7])
        groups = group_by_sentiment([self._snippet(rng, docs) for _ in range(self.dcfg.sentiment_pool)])
        if len(groups) >= 2:
            keys = [c for c in CLASSES if c in groups]
            self.labels["sentiment"] = (keys, [groups[k] for k in keys])

    def _example_text(self, rng: np.random.Generator, group: np.ndarray | list[str]) -> str:
        if isinstance(group, list):  # labelled snippets
            return group[int(rng.integers(len(group)))]
        return self._snippet(rng, group)

    def _shown(self, rng: np.random.Generator, what: str, names: list[str],
               classes: np.ndarray) -> tuple[list[str], bool]:
        """The label words a sample shows for its classes, and whether they are renamed: made-up
        words with probability `renamed_labels`, else the classes' names (for tone, one naming
        drawn per sample)."""
        if rng.random() < self.dcfg.renamed_labels:
            return label_words(rng, len(classes)), True
        if what == "sentiment":
            naming = NAMINGS[int(rng.integers(len(NAMINGS)))]
            return [naming[CLASSES.index(names[int(j)])] for j in classes], False
        return [names[int(j)] for j in classes], False

    def _snippet(self, rng: np.random.Generator, docs: np.ndarray) -> str:
        doc = int(docs[int(rng.integers(len(docs)))])
        n = int(rng.integers(self.dcfg.example_tokens[0], self.dcfg.example_tokens[1] + 1))
        p = int(rng.integers(self.corpus.decoder.doc_len(doc) - n + 1))
        text = one_line(self.codec.decode(self.corpus.decoder_tokens(doc, p, p + n)))
        inner = text[text.find(" ") + 1 : text.rfind(" ")]  # no word cut at either end
        return (inner or text).replace("{", "(").replace("}", ")")

    def sample(self, rng: np.random.Generator, d: int | None = None) -> dict[str, Any]:
        c = self.dcfg
        what = self.kinds[int(rng.integers(len(self.kinds)))]
        names, groups = self.labels[what]
        n_cls = min(int(rng.integers(c.classes[0], c.classes[1] + 1)), len(names))
        classes = rng.choice(len(names), size=n_cls, replace=False)
        shown, renamed = self._shown(rng, what, names, classes)
        line = TEMPLATES[int(rng.integers(len(TEMPLATES)))]

        def example(j: int) -> tuple[str, str, str]:
            """(prompt, label, what follows it): a space before the label goes with the label,
            as the tokenizer would read it in running text."""
            x = self._example_text(rng, groups[int(classes[j])])
            head, _, tail = line.partition("{y}")
            head, y = head.format(x=x, ask=ASK[what]), str(shown[j])
            if head.endswith(" "):
                head, y = head[:-1], " " + y
            return head, y, tail.format()

        n_ctx = int(rng.integers(c.context_examples[0], c.context_examples[1] + 1))
        # every class shown in the context at least once, then at random
        order = list(range(n_cls)) + [int(j) for j in rng.integers(n_cls, size=max(0, n_ctx - n_cls))]
        order = [order[int(i)] for i in rng.permutation(len(order))]
        context_text = "".join("".join(example(j)) for j in order)
        d = self.fit(d or self.D)
        segments: list[tuple[np.ndarray, bool]] = [(self.codec.dec("\n\n"), False)]
        used = len(segments[0][0])
        for j in rng.integers(n_cls, size=int(rng.integers(c.decoder_examples[0], c.decoder_examples[1] + 1))):
            prompt, label, rest = example(int(j))
            p_ids, y_ids, r_ids = self.codec.dec(prompt), self.codec.dec(label), self.codec.dec(rest)
            if used + len(p_ids) + len(y_ids) + len(r_ids) > d // 2:
                break
            segments += [(p_ids, False), (y_ids, True), (r_ids, False)]
            used += len(p_ids) + len(y_ids) + len(r_ids)
        # ordinary text (loss on it) fills the window before the examples
        doc, p = self.pick_window(rng, d)
        head = self.corpus.decoder_tokens(doc, p, p + d - used)
        ids = np.concatenate([head] + [s for s, _ in segments]).astype(np.int64)
        masked = [s if y else np.full(len(s), -100, np.int64) for s, y in segments]
        labels = np.concatenate([head] + masked).astype(np.int64)
        task = np.concatenate([np.zeros(len(head), bool)] + [np.full(len(s), y, bool) for s, y in segments])
        return {
            "input_ids": ids,
            "labels": labels,
            "task_mask": task,
            "doc": doc,
            "position": p,
            "context": [self.codec.enc(context_text)],
            "teacher_prefix": self.codec.dec(context_text)[-self.teacher_tokens :]
            if self.teacher_tokens
            else np.zeros(0, np.int64),
            "label_kind": what,
            "renamed": bool(renamed),
            "shown_labels": [str(s) for s in shown],
        }
