"""Lookup of stated facts through the encoder: short statements with random values are placed at
random depths of a long-document context; after the window the decoder is asked for some of them
and must reproduce the value (loss on the value tokens, and on the window's text as in
`long_document`).

Unlike `copying`, whose answers are real text the decoder can partly guess, the values here are
random draws (numbers, codes, hex ids, dates, words): the loss on them falls only by reading the
encoder, which is the skill needle-in-a-haystack retrieval, multi-value lookup and variable
tracking ask for. Keys, wordings and value types vary per sample; no evaluation template is used.
Formats, one per sample:
    single  1-8 facts with distinct keys, 1-3 of them asked; in `facts.keyless` of the samples the
            facts have no name and distinct attributes ("the ticket number is ..."), asked by the
            attribute alone; in `facts.same_attribute` of the others all share one attribute, wording
            and value type (RULER's multi-key needles), and in `facts.same_key_shape` of those the
            keys' shape too
    multi   one key stated `facts.values` times (2-4) with different values, all asked in order of
            appearance, or in any order (`facts.multi_order`: random)
    chain   a value assigned to a name, then `facts.hops` names (1-4) assigned from names, with
            distractor chains; asked for every name that holds the value, in order
A `multi` or `chain` answer lists its items with ", " or " ", or in `facts.separators` of the samples
with a drawn separator (SEPARATORS), so that a decoder which writes "." after an item goes on.
In `facts.question_styles` of the questions the wording is composed from parts (`wordings`: an
opener, a request, a lead into the answer; hundreds per format) instead of the short forms below.
In `facts.repeat` of the samples the context is a short span of its own text repeated to full length
(a noise haystack): there, copying whatever usually follows the question's last word ("... is")
gives the haystack's word, so only matching the fact's own words finds the value.
"""

from __future__ import annotations

import re
import string
from typing import Any

import numpy as np

from ..config import DataConfig
from ..samples import Corpus, log_uniform
from . import wordings
from .copying import WORD, CopyingBuilder
from .text import TextCodec

ATTRIBUTES = ("code", "number", "ID", "access code", "serial number", "account number", "ticket number",
              "secret word", "password", "lucky number", "room number", "extension", "reference", "PIN",
              "token", "label", "call sign", "order number", "tracking number", "license number")
ATTRIBUTE_WORDS = {w for a in ATTRIBUTES for w in a.lower().split()}  # never a distractor's attribute
# statement wordings in the context: {k} key, {a} attribute, {v} value
STATEMENTS = (
    "The {a} of {k} is {v}.", "{k}'s {a} is {v}.", "Note: the {a} for {k} is {v}.",
    "Remember that {k} has the {a} {v}.", "{v} is the {a} of {k}.", "{k} - {a}: {v}", "[{k}] {a} = {v}",
    '{k}.{u} = "{v}"', "| {k} | {a} | {v} |", "For the record, {k} was given {a} {v}.",
    "Important: {k} uses {a} {v}.", "({k}, {a}: {v})",
)
# questions in the decoder; the answer follows as " {v}"
QUESTIONS = (
    "What is the {a} of {k}? The {a} of {k} is", "Q: What {a} does {k} have?\nA:", "{k}'s {a}:",
    "Looking back at the text, the {a} for {k} was", "The {a} of {k}, as stated above, is",
    "{k} -> {a} =", "Answer: the {a} of {k} is", "Which {a} belongs to {k}? It is",
)
# one fact and no key: "the code is ..." (a lone secret in a long text, asked without naming its owner)
KEYLESS_STATEMENTS = ("The {a} is {v}.", "Remember: the {a} is {v}.", "{v} is the {a}.", "Your {a} is {v}. Keep it.",
                      "(The {a} for today: {v}.)", "Please note the {a}: {v}.", "The {a} you will need is {v}.")
KEYLESS_QUESTIONS = ("What is the {a}? The {a} is", "Q: What was the {a}?\nA:", "The {a} mentioned above is",
                     "Recall the {a}:", "Which {a} was given in the text? It was", "Tell me the {a}. The {a} is")
MULTI_STATEMENTS = ("One {a} of {k} is {v}.", "{k} also has the {a} {v}.", "Another {a} for {k}: {v}.",
                    "{k} is listed with {a} {v}.")
MULTI_QUESTIONS = ("List every {a} of {k}, in the order given:", "All {a}s of {k} mentioned above:",
                   "Q: Which {a}s does {k} have?\nA:")
MULTI_QUESTIONS_ANY_ORDER = tuple(q for q in MULTI_QUESTIONS if "order" not in q)
ASSIGNMENTS = ("{x} = {y}", "let {x} = {y};", "set {x} to {y}.", "{x} := {y}", "{x} is assigned {y}.",
               "{x} takes the value of {y}.")
CHAIN_QUESTIONS = ("Which names hold the value {v}? In order:", "Every variable equal to {v}:",
                   "Q: Which names end up with {v}?\nA:")
# opening a window: a user's prompt often starts with an instruction, which must not stop the model
# from reading the context
INSTRUCTIONS = (
    "Read the document below. You will be asked about details in it.\n\n",
    "The following text may contain facts you need later. Pay attention.\n\n",
    "Answer questions about the text exactly, using what it states.\n\n",
    "You are a careful assistant. Use the text you were given to answer.\n\n",
    "Below is part of a long document; questions about the whole document follow.\n\n",
    "Instructions: keep track of names, numbers and codes in the text.\n\n",
)
# how a listed answer's items may be separated (`facts.separators`)
SEPARATORS = (", ", "; ", ". ", "\n", " | ")
CUES = ("\n\n", "\n\nQuestions about the text above.\n", "\n\n---\n", "\n\nFrom memory of the text:\n")
SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]


class FactsBuilder(CopyingBuilder):
    """Long-document windows whose context holds random facts, ending in questions about them."""

    kind = "facts"
    FORMATS = ("single", "multi", "chain")

    def __init__(self, corpus: Corpus, cfg: DataConfig, codec: TextCodec, teacher_tokens: int = 0):
        super().__init__(corpus, cfg, codec, teacher_tokens)
        weights = np.array([cfg.facts.formats.get(f, 0.0) for f in self.FORMATS], dtype=np.float64)
        self.format_p = weights / weights.sum()

    def context_length(self, rng: np.random.Generator, q: float | None = None) -> int:
        """Encoder tokens of this sample's context: `data.facts.context_tokens` when set."""
        if self.cfg.facts.context_tokens is None:
            return super().context_length(rng, q)
        return log_uniform(rng, *self.cfg.facts.context_tokens, q)

    def sample(self, rng: np.random.Generator, d: int | None = None, context_q: float | None = None) -> dict[str, Any]:
        base = super(CopyingBuilder, self).sample(rng, d, context_q)  # a plain long-document window
        ids, (context,) = base["input_ids"], base["context"]
        budget = min(self.cfg.copying.task_tokens, len(ids) // 2)
        text = self.codec.decode(self._context_decoder_tokens(base["doc"], base["position"], len(context)))
        words = sorted(set(WORD.findall(text))) or ["river", "lantern", "copper", "meadow"]
        teacher = base["teacher_prefix"]
        if rng.random() < self.cfg.facts.repeat:
            # half the noise haystacks repeat a span of the text, half repeat statements of the facts'
            # own forms about other names and attributes (hard negatives: "the X is V" everywhere)
            text = _repeated(rng, text) if rng.random() < 0.5 else \
                _repeated(rng, _distractors(rng, words), length=len(text), whole=True)
            if rng.random() < self.cfg.facts.repeat_window:
                # the teacher (distillation) reads the haystack before the window as well
                ids = self._haystack_window(text, len(teacher) + len(ids))
                teacher, ids = ids[: len(teacher)], ids[len(teacher) :]
        for _ in range(3):  # a draw whose answer the window happens to hold is redrawn
            fmt = self.FORMATS[int(rng.choice(len(self.FORMATS), p=self.format_p))]
            statements, qa = getattr(self, f"_{fmt}")(rng, words)
            segments = self._segments(rng, qa, budget)
            out = self._assemble(ids, segments) if segments else None
            if out is None:
                continue
            new_context = self._place(rng, text, statements, len(context))
            if rng.random() < self.cfg.facts.instruction:
                out = self._instructed(rng, out)
            base.update(out, context=[new_context], teacher_prefix=teacher, copy_format=f"facts_{fmt}")
            return base
        return base

    # ------------------------------------------------------------------ facts
    def _single(self, rng, words):
        lo, hi = self.cfg.facts.facts
        n = int(rng.integers(lo, hi + 1))
        if rng.random() < self.cfg.facts.keyless:
            return self._keyless(rng, words, n)
        keys = _distinct(lambda: _key(rng, words), n)
        shared = _pick(rng, ATTRIBUTES) if rng.random() < self.cfg.facts.same_attribute else None
        if shared and self.cfg.facts.same_key_shape > 0 and rng.random() < self.cfg.facts.same_key_shape:
            # redrawn rather than drawn once after `shared`: at share 0 the draws stay as before
            shape = int(rng.integers(KEY_SHAPES))
            keys = _distinct(lambda: _key(rng, words, shape), n)
        # hard negatives as in RULER's multi-key needles: the facts share attribute, wording and value
        # type, and differ only in their key
        shared_form, kind = (_pick(rng, STATEMENTS), int(rng.integers(5))) if shared else (None, None)
        statements, qa = [], []
        for k in keys:
            a, v = shared or _pick(rng, ATTRIBUTES), _value(rng, words, kind)
            form = shared_form or _pick(rng, STATEMENTS)
            statements.append(form.format(k=k, a=a, u=a.replace(" ", "_"), v=v))
            qa.append((_question(rng, self.cfg.facts.question_styles, QUESTIONS, wordings.SINGLE).format(k=k, a=a), v))
        lo, hi = self.cfg.facts.queries
        asked = rng.permutation(len(qa))[: int(rng.integers(lo, hi + 1))]
        return statements, [qa[int(i)] for i in asked]

    def _keyless(self, rng, words, n):
        """n facts without a name, one per attribute; 1-3 asked by their attribute."""
        attributes: list[str] = []
        for i in rng.permutation(len(ATTRIBUTES)):  # none inside another ("number", "room number")
            a = ATTRIBUTES[int(i)]
            if len(attributes) < n and not any(a in b or b in a for b in attributes):
                attributes.append(a)
        values = [_value(rng, words) for _ in attributes]
        statements = [_pick(rng, KEYLESS_STATEMENTS).format(a=a, v=v) for a, v in zip(attributes, values)]
        qa = [(_pick(rng, KEYLESS_QUESTIONS).format(a=a), v) for a, v in zip(attributes, values)]
        lo, hi = self.cfg.facts.queries
        asked = rng.permutation(n)[: int(rng.integers(lo, hi + 1))]
        return statements, [qa[int(i)] for i in asked]

    def _multi(self, rng, words):
        k, a = _key(rng, words), _pick(rng, ATTRIBUTES)
        kind = int(rng.integers(5))
        lo, hi = self.cfg.facts.values
        values = _distinct(lambda: _value(rng, words, kind), int(rng.integers(lo, hi + 1)))
        statements = [_pick(rng, MULTI_STATEMENTS).format(k=k, a=a, v=v) for v in values]
        questions = MULTI_QUESTIONS
        if self.cfg.facts.multi_order == "random":  # placement keeps the statements' order; the answer not
            values = [values[int(i)] for i in rng.permutation(len(values))]
            questions = MULTI_QUESTIONS_ANY_ORDER
        answer = _listed(rng, values, ", ", self.cfg.facts.separators)
        question = _question(rng, self.cfg.facts.question_styles, questions, wordings.MULTI)
        return statements, [(question.format(k=k, a=a), answer)]

    def _chain(self, rng, words):
        # the target chain (`facts.hops` assignments after its value) and 1-4 distractor chains (0 to
        # as many hops), as in RULER's variable tracking, where 5 chains of assignments share one haystack
        lo, hi = self.cfg.facts.hops
        hops, others = int(rng.integers(lo, hi + 1)), int(rng.integers(1, 5))
        lengths = [hops + 1] + [int(rng.integers(1, hi + 2)) for _ in range(others)]
        names = _distinct(lambda: _name(rng), sum(lengths))
        form = _pick(rng, ASSIGNMENTS)
        values = _distinct(lambda: _digits(rng, int(rng.integers(4, 8))), len(lengths))
        ends = np.cumsum(lengths)
        chains = [names[e - n : e] for e, n in zip(ends, lengths)]
        statements = []
        for chain, v in zip(chains, values):
            statements.append(form.format(x=chain[0], y=v))
            statements += [form.format(x=x, y=prev) for prev, x in zip(chain, chain[1:])]
        if rng.random() < 0.5:  # the distractors' assignments interleave with the target's
            order = np.argsort(rng.random(len(statements)) + np.array(
                [i for c in chains for i in range(len(c))], dtype=np.float64))
            statements = [statements[int(i)] for i in order]
        # placement keeps statement order (depth increases along the list): a hop always follows its source
        answer = _listed(rng, chains[0], " ", self.cfg.facts.separators)
        question = _question(rng, self.cfg.facts.question_styles, CHAIN_QUESTIONS, wordings.CHAIN)
        return statements, [(question.format(v=values[0]), answer)]

    # ------------------------------------------------------------------ assembly
    def _haystack_window(self, text: str, n: int) -> np.ndarray:
        """(n,) decoder ids: the repeated haystack `text` going on through the window."""
        ids = self.codec.dec(" " + text)
        return np.tile(ids, -(-n // max(len(ids), 1)))[-n:].astype(np.int64)

    def _instructed(self, rng, out: dict) -> dict:
        """The window's first tokens replaced by an instruction (no loss on it)."""
        instruction = self.codec.dec(_pick(rng, INSTRUCTIONS))
        n = len(instruction)
        if 4 * n > len(out["input_ids"]) or out["task_mask"][:n].any():
            return out
        ids, labels = out["input_ids"].copy(), out["labels"].copy()
        ids[:n], labels[:n] = instruction, -100
        return dict(out, input_ids=ids, labels=labels)

    def _segments(self, rng, qa: list[tuple[str, str]], budget: int) -> list[tuple[np.ndarray, bool | str]] | None:
        """Cue, then per question: the question (no loss), " value" (loss), the line's end: ".\n", or
        "\n" after a list of sentences, whose "." also follows every item (the new line tells the
        end from " next item")."""
        return self._qa_segments(_pick(rng, CUES), ((q, " " + v, "\n" if v.endswith(".") else ".\n") for q, v in qa),
                                 budget)

    def _place(self, rng, text: str, statements: list[str], n_context: int) -> np.ndarray:
        """The context's text with `statements` inserted at word boundaries, in order, at random
        depths; cut at its start so it keeps its encoder length -> (n_context,) encoder ids."""
        inserts = [" " + s + " " for s in statements]
        extra = sum(len(self.codec.enc(s)) for s in inserts)
        ids, keep = self.codec.enc(text), n_context - extra
        if 0 < keep < len(ids):  # room for the statements: the oldest text makes it
            text = self.codec.decode_encoder(ids[-keep:])
        bounds = [m.start() for m in re.finditer(r"\s", text)] or [len(text)]
        at = np.sort(rng.choice(bounds, size=len(inserts)))
        pieces, prev = [], 0
        for pos, s in zip(at, inserts):
            pieces += [text[prev:int(pos)], s]
            prev = int(pos)
        pieces.append(text[prev:])
        out = self.codec.enc("".join(pieces))
        # a token or two more than before, where inserts change how the text around them merges
        return out[-n_context:] if keep > 0 else out


def _distractors(rng: np.random.Generator, words: list[str]) -> str:
    """2-5 statements in the facts' own forms about names and attributes that are never asked: a
    text word as the attribute (none of ATTRIBUTES), or a made-up name; random values."""
    plain = [w for w in words if w.lower() not in ATTRIBUTE_WORDS] or ["river"]
    out = []
    for _ in range(int(rng.integers(2, 6))):
        if rng.random() < 0.5:
            out.append(_pick(rng, KEYLESS_STATEMENTS).format(a=_pick(rng, plain).lower(), v=_value(rng, words)))
        else:
            a, k, v = _pick(rng, ATTRIBUTES), _key(rng, words), _value(rng, words)
            out.append(_pick(rng, STATEMENTS).format(k=k, a=a, u=a.replace(" ", "_"), v=v))
    return " ".join(out)


def _repeated(rng: np.random.Generator, text: str, length: int | None = None, whole: bool = False) -> str:
    """One span of `text` (1-4 sentences, or 8-60 words; all of it if `whole`) repeated to at least
    `length` characters (default: the text's)."""
    length = len(text) if length is None else length
    if whole:
        span = text
    elif rng.random() < 0.5:
        sentences = [x for x in re.split(r"(?<=[.!?])\s+", text) if x.strip()]
        i = int(rng.integers(max(1, len(sentences) - 4) + 1)) if sentences else 0
        span = " ".join(sentences[i : i + int(rng.integers(1, 5))])
    else:
        words = text.split()
        i = int(rng.integers(max(1, len(words) - 8)))
        span = " ".join(words[i : i + int(rng.integers(8, 61))])
    span = span.strip() or "The river runs past the mill."
    return " ".join([span] * (length // (len(span) + 1) + 1))


def _listed(rng: np.random.Generator, items: list[str], default: str, share: float) -> str:
    """`items` joined by `default`, or in `share` of the calls by a drawn separator; a list of
    sentences ("a. b. c.") ends in its own period (see `FactsBuilder._segments`). No draw at share 0,
    so recipes without it get the same samples as before."""
    if share <= 0 or rng.random() >= share:
        return default.join(items)
    sep = _pick(rng, SEPARATORS)
    return sep.join(items) + ("." if sep == ". " else "")


def _question(rng: np.random.Generator, share: float, forms: tuple[str, ...], more: wordings.Composed) -> str:
    """A question wording from `forms`, or in `share` of the draws composed by `more` (no extra draw
    at share 0, so recipes without `facts.question_styles` get the same samples as before)."""
    return more.draw(rng) if share > 0 and rng.random() < share else _pick(rng, forms)


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _distinct(draw, n: int) -> list[str]:
    out: list[str] = []
    for _ in range(20 * n):
        x = draw()
        if x not in out:
            out.append(x)
        if len(out) == n:
            break
    return out


KEY_SHAPES = 5  # the shapes `_key` draws from


def _key(rng: np.random.Generator, words: list[str], shape: int | None = None) -> str:
    """A made-up name, a word of the text with a number, an identifier, two words of the text
    joined by a hyphen, or a hex id (`shape` 0-4, drawn when None): keys that differ in one word or
    a few characters must still be told apart, so the lookup has to match the key's own tokens."""
    r = int(rng.integers(KEY_SHAPES)) if shape is None else shape
    if r == 0:
        return "".join(_pick(rng, SYLLABLES) for _ in range(int(rng.integers(2, 4)))).capitalize()
    if r == 1:
        return f"{_pick(rng, words).lower()}-{int(rng.integers(2, 100))}"
    if r == 2:
        return f"{_pick(rng, ('user', 'item', 'node', 'unit', 'case', 'agent'))}_{int(rng.integers(10, 10000))}"
    if r == 3:
        return f"{_pick(rng, words).lower()}-{_pick(rng, words).lower()}"
    return "".join(rng.choice(list("0123456789abcdef"), int(rng.integers(6, 13))))


def _name(rng: np.random.Generator) -> str:
    if rng.random() < 0.5:
        return "".join(rng.choice(list(string.ascii_uppercase), int(rng.integers(3, 6))))
    return "".join(_pick(rng, SYLLABLES) for _ in range(2)) + str(int(rng.integers(10)))


def _digits(rng: np.random.Generator, n: int) -> str:
    return str(int(rng.integers(1, 10))) + "".join(str(int(d)) for d in rng.integers(0, 10, n - 1))


def _value(rng: np.random.Generator, words: list[str], kind: int | None = None) -> str:
    """A random value: digits, an alphanumeric code, hex, a date or two words of the text."""
    kind = int(rng.integers(5)) if kind is None else kind
    if kind == 0:
        return _digits(rng, int(rng.integers(2, 11)))
    if kind == 1:
        code = "".join(rng.choice(list(string.ascii_uppercase + string.digits), int(rng.integers(4, 9))))
        return code if rng.random() < 0.5 else code[: len(code) // 2] + "-" + code[len(code) // 2 :]
    if kind == 2:
        h = "".join(rng.choice(list("0123456789abcdef"), 32))
        return h[: int(rng.integers(6, 13))] if rng.random() < 0.7 else \
            f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"
    if kind == 3:
        return f"{int(rng.integers(1700, 2100))}-{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 29)):02d}"
    return " ".join(_pick(rng, words).lower() for _ in range(int(rng.integers(1, 3))))
