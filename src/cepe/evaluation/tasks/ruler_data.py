"""RULER's synthetic tasks as text: our own generators of the definitions in NVIDIA/RULER
(Hsieh et al., 2024, `scripts/data/synthetic/` and `scripts/synthetic.yaml`); `ruler.py` sizes
them to a token budget and runs them.

Each generator takes a `random.Random` and a haystack size `n` (filler units, or words for the
word tasks) and returns a `Sample`: the instruction (`intro`, with a one-shot example where RULER
has one), the `context` holding the needles, and the `question` that ends with RULER's answer
prefix, so that a plain decoder continues with the answer. Nothing is downloaded: the filler is
RULER's noise sentences or any text file, and the word lists are a bundled resource
(`cepe/resources/ruler_words.txt`, from the wonderwords lists RULER uses). Where ours differ
from RULER's, docs/evaluation.md says so.
"""

from __future__ import annotations

import re
import string
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from random import Random

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
# RULER's needle depths: 40 evenly spaced percentages of the haystack, 0 to 100
DEPTHS = [round(100 * i / 39) for i in range(40)]


@dataclass
class Sample:
    """One example as text: `intro + context + question`, answered by continuing `question`.

    answers: the expected strings; `metric` "all" scores the fraction found in the prediction
    (RULER's string_match_all), "part" whether any is (string_match_part).
    max_new_tokens: RULER's generation budget for the task (reserved in the length budget).
    depths: where the needles went, in percent of the haystack (needle tasks)."""

    task: str
    intro: str
    context: str
    question: str
    answers: list[str]
    max_new_tokens: int
    metric: str = "all"
    depths: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class TaskSpec:
    kind: str  # niah | vt | cwe | fwe
    max_new_tokens: int  # RULER's tokens_to_generate
    options: dict = field(default_factory=dict)


# Our names -> RULER's definitions (synthetic.yaml). RULER's niah_single_2/_3, niah_multikey_1,
# niah_multivalue and niah_multiquery use its essay haystack: here the haystack is the noise or
# --haystack FILE for every task, so niah_single_1 and _2 are one task here.
TASKS = {
    "niah_single": TaskSpec("niah", 128, {"keys": "words", "values": "numbers"}),  # niah_single_1/_2
    "niah_single_uuid": TaskSpec("niah", 128, {"keys": "words", "values": "uuids"}),  # niah_single_3
    "niah_multikey": TaskSpec("niah", 128, {"keys": "words", "values": "numbers", "num_keys": 4}),  # _1
    "niah_multikey_needles": TaskSpec("niah", 128, {"keys": "words", "values": "numbers", "distractors": True}),  # _2
    "niah_multikey_uuid": TaskSpec("niah", 128, {"keys": "uuids", "values": "uuids", "distractors": True}),  # _3
    "niah_multivalue": TaskSpec("niah", 128, {"keys": "words", "values": "numbers", "num_values": 4}),
    "niah_multiquery": TaskSpec("niah", 128, {"keys": "words", "values": "numbers", "num_queries": 4}),
    "vt": TaskSpec("vt", 30, {"chains": 1, "hops": 4}),
    "cwe": TaskSpec("cwe", 120, {"common": 10, "freq_common": 30, "freq_uncommon": 3}),
    "fwe": TaskSpec("fwe", 50, {"alpha": 2.0}),
}
DEFAULT_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")


@dataclass(frozen=True)
class Words:
    nouns: tuple[str, ...]
    adjectives: tuple[str, ...]
    verbs: tuple[str, ...]


@lru_cache(maxsize=1)
def bundled_words() -> Words:
    """The bundled noun / adjective / verb lists (sorted, unique)."""
    text = resources.files("cepe").joinpath("resources/ruler_words.txt").read_text(encoding="utf-8")
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[] \n"), [])
        else:
            current.extend(line.split())
    return Words(*(tuple(sections[k]) for k in ("nouns", "adjectives", "verbs")))


class Haystack:
    """The filler needles are hidden in: RULER's noise sentences repeated, one unit a line, or the
    sentences of a text (`--haystack FILE`), cycled from the start, joined by spaces."""

    def __init__(self, text: str | None = None, name: str = "noise"):
        if text is None:
            self.units, self.sep, self.name = [NOISE], "\n", "noise"
            return
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s]
        if not sentences:
            raise ValueError(f"haystack {name!r} has no text")
        self.units, self.sep, self.name = sentences, " ", name

    @classmethod
    def from_file(cls, path: str | Path) -> Haystack:
        return cls(Path(path).read_text(encoding="utf-8"), Path(path).name)

    def take(self, n: int) -> list[str]:
        return [self.units[i % len(self.units)] for i in range(n)]


def insert_at_depths(units: list[str], items: list[str], rng: Random) -> tuple[list[str], list[int]]:
    """`items`, in order, inserted among `units` at depths drawn without repeats from `DEPTHS`."""
    depths = sorted(rng.sample(DEPTHS, len(items)))
    out, prev = [], 0
    for depth, item in zip(depths, items):
        pos = int(len(units) * depth / 100)
        out += units[prev:pos] + [item]
        prev = pos
    return out + units[prev:], depths


def random_value(kind: str, rng: Random, words: Words) -> str:
    """A needle key or value: a 7-digit number, an adjective-noun word, or a UUID (version 4)."""
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return f"{rng.choice(words.adjectives)}-{rng.choice(words.nouns)}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type {kind!r}")


def _distinct(draw, count: int) -> list[str]:
    """`count` distinct draws, in the order drawn."""
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < count:
        x = draw()
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def niah(rng: Random, haystack: Haystack, n: int, words: Words, task: str = "niah", keys: str = "words",
         values: str = "numbers", num_keys: int = 1, num_values: int = 1, num_queries: int = 1,
         distractors: bool = False, max_new_tokens: int = 128) -> Sample:
    """Needle(s) in a haystack of `n` units (or of `n` distractor needles with other keys)."""
    num_keys = max(num_keys, num_queries)
    key_list = _distinct(lambda: random_value(keys, rng, words), num_keys)
    value_lists = [[random_value(values, rng, words) for _ in range(num_values)] for _ in key_list]
    needles = [NEEDLE.format(kind=values, key=k, value=v) for k, vs in zip(key_list, value_lists) for v in vs]
    rng.shuffle(needles)
    if distractors:
        other = _distinct(lambda: random_value(keys, rng, words), n + num_keys)
        other = [k for k in other if k not in key_list][:n]
        units, sep = [NEEDLE.format(kind=values, key=k, value=random_value(values, rng, words)) for k in other], "\n"
    else:
        units, sep = haystack.take(n), haystack.sep
    units, depths = insert_at_depths(units, needles, rng)
    asked = rng.sample(range(num_keys), num_queries)
    answers = [v for i in asked for v in value_lists[i]]
    queried = [key_list[i] for i in asked]
    query = queried[0] if len(queried) == 1 else ", ".join(queried[:-1]) + ", and " + queried[-1]
    if num_queries * num_values == 1:  # RULER's singular wording
        one = values[:-1]
        intro = (f"A special magic {one} is hidden within the following text. Make sure to memorize it. "
                 f"I will quiz you about the {one} afterwards.\n")
        question = (f"\nWhat is the special magic {one} for {query} mentioned in the provided text? "
                    f"The special magic {one} for {query} mentioned in the provided text is")
    else:
        intro = (f"Some special magic {values} are hidden within the following text. Make sure to memorize it. "
                 f"I will quiz you about the {values} afterwards.\n")
        question = (f"\nWhat are all the special magic {values} for {query} mentioned in the provided text? "
                    f"The special magic {values} for {query} mentioned in the provided text are")
    return Sample(task, intro, sep.join(units), question, answers, max_new_tokens, "all", depths)


VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"


def _vt_parts(rng: Random, haystack: Haystack, n: int, chains: int, hops: int, name_len: int):
    names = _distinct(lambda: "".join(rng.choices(string.ascii_uppercase, k=name_len)), chains * (hops + 1))
    links, values = [], []
    for c in range(chains):
        v = names[c * (hops + 1) : (c + 1) * (hops + 1)]
        values.append(str(rng.randint(10000, 99999)))
        links.append([f"VAR {v[0]} = {values[-1]}"] + [f"VAR {v[j + 1]} = VAR {v[j]}" for j in range(hops)])
    # the chains interleaved at random, each in its own order
    order = [c for c in range(chains) for _ in range(hops + 1)]
    rng.shuffle(order)
    taken = [0] * chains
    statements = []
    for c in order:
        statements.append(links[c][taken[c]] + ("." if haystack.sep == " " else ""))
        taken[c] += 1
    units, _ = insert_at_depths(haystack.take(n), statements, rng)
    question = (f"\nQuestion: Find all variables that are assigned the value {values[0]} in the text above. "
                f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables "
                f"are assigned the value {values[0]}, they are:")
    return haystack.sep.join(units), question, names[: hops + 1]


def variable_tracking(rng: Random, haystack: Haystack, n: int, task: str = "vt", chains: int = 1, hops: int = 4,
                      max_new_tokens: int = 30) -> Sample:
    """Chains `VAR A = 12345`, `VAR B = VAR A`, ... hidden in `n` filler units; name every
    variable of the first chain. One worked example (3-letter names, 5 filler units) comes first."""
    ex_context, ex_question, ex_answers = _vt_parts(rng, haystack, 5, chains, hops, 3)
    example = VT_INTRO + ex_context + ex_question + " " + " ".join(ex_answers) + "\n"
    context, question, answers = _vt_parts(rng, haystack, n, chains, hops, 5)
    return Sample(task, example + VT_INTRO, context, question, answers, max_new_tokens, "all")


CWE_INTRO = ("Below is a numbered list of words. In these words, some appear more often than others. "
             "Memorize the ones that appear most often.\n")


def _cwe_parts(rng: Random, pool: list[str], n: int, common: int, freq_common: int, freq_uncommon: int):
    chosen = rng.sample(pool, n)
    top, rest = chosen[:common], chosen[common:]
    listed = top * freq_common + rest * freq_uncommon
    rng.shuffle(listed)
    context = " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed))
    question = (f"\nQuestion: What are the {common} most common words in the above list? "
                f"Answer: The top {common} words that appear most often in the list are:")
    return context, question, top


def common_words(rng: Random, n: int, length: int, words: Words, task: str = "cwe", common: int = 10,
                 freq_common: int = 30, freq_uncommon: int = 3, max_new_tokens: int = 120) -> Sample:
    """A numbered list of `n` distinct words: `common` of them `freq_common` times each, the rest
    `freq_uncommon` times (below 4K tokens 6 and 1, as RULER); name the common ones. One worked
    example (40 words, 10 / 3 times; below 4K 20 words, 3 / 1) comes first."""
    pool = sorted(set(words.nouns + words.adjectives + words.verbs))
    if n > len(pool):  # RULER switches to a larger list; we add adjective-noun pairs
        pool = pool + sorted(
            {f"{a}-{b}" for a in words.adjectives for b in words.nouns[: 1 + n // len(words.adjectives)]}
        )
    if length < 4096:
        ex_n, ex_fc, ex_fu, freq_common, freq_uncommon = 20, 3, 1, 6, 1
    else:
        ex_n, ex_fc, ex_fu = 40, 10, 3
    ex_context, ex_question, ex_answers = _cwe_parts(rng, pool, ex_n, common, ex_fc, ex_fu)
    example = CWE_INTRO + ex_context + ex_question + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_answers))
    context, question, answers = _cwe_parts(rng, pool, max(n, common), common, freq_common, freq_uncommon)
    return Sample(task, example + "\n" + CWE_INTRO, context, question, answers, max_new_tokens, "all")


FWE_INTRO = ("Read the following coded text and track the frequency of each coded word. "
             "Find the three most frequently appeared coded words. ")


def zeta(alpha: float, terms: int = 100_000) -> float:
    """Riemann zeta(alpha), alpha > 1: a partial sum and the integral of the tail."""
    return sum(k**-alpha for k in range(1, terms)) + terms ** (1 - alpha) / (alpha - 1)


def frequent_words(rng: Random, n: int, length: int, task: str = "fwe", alpha: float = 2.0, word_len: int = 6,
                   max_new_tokens: int = 50) -> Sample:
    """About `n` coded words (random `word_len` letters) with Zipf(`alpha`) counts over a
    vocabulary of length / 50 words; the most frequent is '...' (noise); name the next three."""
    vocab_size = max(8, (length - max_new_tokens) // 50)
    vocab = _distinct(lambda: "".join(rng.choices(string.ascii_lowercase, k=word_len)), vocab_size)
    vocab[0] = "..."
    z = zeta(alpha)
    coded = [w for k, w in enumerate(vocab, start=1) for _ in range(int(n * k**-alpha / z))]
    rng.shuffle(coded)
    question = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
                "frequently appeared words in the above coded text? Answer: According to the coded text above, "
                "the three most frequently appeared words are:")
    return Sample(task, FWE_INTRO, " ".join(coded), question, vocab[1:4], max_new_tokens, "all")


def generate(task: str, rng: Random, n: int, length: int, haystack: Haystack, words: Words | None = None) -> Sample:
    """Sample of `task` with haystack size `n` (units, needles or words) for a `length`-token budget."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r} (known: {', '.join(TASKS)})")
    spec = TASKS[task]
    words = words or bundled_words()
    common = {"task": task, "max_new_tokens": spec.max_new_tokens, **spec.options}
    if spec.kind == "niah":
        return niah(rng, haystack, n, words, **common)
    if spec.kind == "vt":
        return variable_tracking(rng, haystack, n, **common)
    if spec.kind == "cwe":
        return common_words(rng, n, length, words, **common)
    return frequent_words(rng, n, length, **common)
