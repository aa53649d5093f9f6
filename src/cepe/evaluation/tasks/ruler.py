"""RULER (Hsieh et al., 2024): synthetic long-context tasks, score against length, and each
method's effective length.

Samples come from `ruler_data` (needles in a haystack, variable tracking, common- and
frequent-word extraction), sized like RULER's: the largest haystack whose prompt plus the task's
generation budget fits the length, counted in the decoder's tokens. Each prompt is laid out like
a `passkey` one: the instruction (`Request.prefix`) stays in every method's decoder, the last D
tokens of the rest (they end with the question and RULER's answer prefix) are the decoder window,
and everything before them is the context (CEPE's encoder, REPLUG's passes, the window of `full`
and `streamingllm`; `truncated` drops it). Greedy answers are scored by substring match, as RULER
does: the fraction of the expected strings found (`string_match_all`), or whether any is
(`string_match_part`), case-insensitive, as 0-100.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from random import Random
from typing import Any

from tqdm.auto import tqdm

from ..methods import DoesNotFit, Method
from ..report import Timer
from .common import encode, mean, stop_ids, window_request
from .ruler_data import DEFAULT_TASKS, TASKS, Haystack, Sample, Words, bundled_words, generate

# RULER's threshold for the effective length: LLaMA-2-7B's average score at 4K tokens
THRESHOLD = 85.6


@dataclass
class RulerSettings:
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    lengths: list[int] = field(default_factory=lambda: [4096, 8192, 16384, 32768, 65536, 131072])
    samples: int = 4  # per task and length
    decoder_tokens: int = 512  # D
    seed: int = 0
    max_new_tokens: int | None = None  # cap on RULER's per-task budget (None: RULER's)
    batch_size: int = 4  # prompts per generate call
    threshold: float = THRESHOLD

    def __post_init__(self):
        self.tasks = [t.strip() for t in self.tasks if t.strip()]
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"unknown RULER task(s) {unknown or self.tasks} (known: {', '.join(TASKS)})")
        if self.samples < 1 or self.decoder_tokens < 1 or self.batch_size < 1 or not self.lengths:
            raise ValueError("samples, decoder_tokens, batch_size must be >= 1 and lengths non-empty")

    def new_tokens(self, task: str) -> int:
        budget = TASKS[task].max_new_tokens
        return budget if self.max_new_tokens is None else min(budget, self.max_new_tokens)


@dataclass
class Prompt:
    """A sample in decoder ids: `prefix` (the instruction) and `body` (context + question)."""

    sample: Sample
    prefix: list[int]
    body: list[int]
    size: int  # haystack units / words

    @property
    def budget_tokens(self) -> int:
        """Prompt tokens plus the task's generation budget: at most the length (RULER's rule)."""
        return len(self.prefix) + len(self.body) + self.sample.max_new_tokens


class PromptBuilder:
    """Samples sized to a length: the haystack size is searched once per (task, length) on the
    first sample, then lowered per sample until it fits (samples differ a little in tokens)."""

    def __init__(self, tokenizer: Any, haystack: Haystack | None = None, words: Words | None = None, seed: int = 0):
        self.tokenizer, self.haystack, self.seed = tokenizer, haystack or Haystack(), seed
        self.words = words or bundled_words()
        self.sizes: dict[tuple[str, int], int] = {}

    def make(self, task: str, length: int, index: int, size: int) -> Prompt:
        # one seed per sample: its keys, values and draws do not depend on the search's path
        rng = Random(f"{self.seed}/{task}/{length}/{index}")
        s = generate(task, rng, size, length, self.haystack, self.words)
        tok = self.tokenizer
        return Prompt(s, encode(tok, s.intro), encode(tok, s.context) + encode(tok, s.question), size)

    def _largest(self, task: str, length: int) -> int:
        if self.make(task, length, 0, 1).budget_tokens > length:
            raise ValueError(f"ruler {task}: even the smallest sample does not fit {length} tokens")
        lo = 1
        while lo < 1 << 24 and self.make(task, length, 0, 2 * lo).budget_tokens <= length:
            lo *= 2
        hi = 2 * lo  # lo fits, hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.make(task, length, 0, mid).budget_tokens <= length else (lo, mid)
        return lo

    def prompt(self, task: str, length: int, index: int) -> Prompt:
        if (task, length) not in self.sizes:
            self.sizes[(task, length)] = self._largest(task, length)
        size = self.sizes[(task, length)]
        step = max(1, size // 50)
        p = self.make(task, length, index, size)
        while p.budget_tokens > length and p.size > 1:
            p = self.make(task, length, index, max(1, p.size - step))
        if p.budget_tokens > length:
            raise ValueError(f"ruler {task}: sample {index} does not fit {length} tokens")
        return p

    def reuse_sizes(self, results: dict) -> None:
        """Take the haystack sizes a `cepe eval ruler` result used (its `results` dict), so that
        `prompt` rebuilds exactly its samples: a probe re-asks what the evaluation asked."""
        for cell, size in results["haystack_size"].items():
            task, length = cell.rsplit("@", 1)
            self.sizes[(task, int(length))] = int(size)


def string_match_all(prediction: str, answers: list[str]) -> float:
    """Fraction of the answers found in the prediction (case-insensitive substrings)."""
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def string_match_part(prediction: str, answers: list[str]) -> float:
    """1.0 when any answer is in the prediction (case-insensitive substrings)."""
    pred = prediction.lower()
    return float(any(a.lower() in pred for a in answers))


METRICS = {"all": string_match_all, "part": string_match_part}


def effective_length(average: dict[int, float | None], threshold: float = THRESHOLD) -> int | None:
    """The longest length whose average score over the tasks is above `threshold` (None: none)."""
    above = [length for length, v in average.items() if v is not None and v > threshold]
    return max(above) if above else None


def _generate(method: Method, requests, max_new_tokens: int, stops, batch_size: int, timer: Timer,
              done: Callable[[int], None] = lambda n: None) -> list:
    """Greedy answers in batches; a request the method cannot read (`DoesNotFit`) gets None.
    `done(n)` after each batch of n (a CPU cell of 32 samples at 16K takes ~15 minutes)."""
    outs: list = []
    for i in range(0, len(requests), batch_size):
        batch = requests[i : i + batch_size]
        with timer(method.name):
            try:
                outs += method.generate_batch(batch, max_new_tokens, stops)
            except DoesNotFit:
                for r in batch:  # one at a time: those that fit still answer
                    try:
                        outs.append(method.generate(r, max_new_tokens, stops))
                    except DoesNotFit:
                        outs.append(None)
        done(len(batch))
    return outs


def run(methods: dict[str, Method], s: RulerSettings, tokenizer: Any, haystack: Haystack | None = None,
        timer: Timer | None = None, progress: bool = True, after_cell: Callable[[dict], None] | None = None,
        words: Words | None = None) -> dict:
    """Every method on `s.samples` prompts per task and length. `after_cell`, if given, gets the
    result so far (cells not run yet are None) after each (task, length), to save partial results."""
    timer = timer or Timer()
    builder = PromptBuilder(tokenizer, haystack, words, s.seed)
    stops = stop_ids(tokenizer, newline=False)  # RULER stops on end of sequence only
    scores = {name: {t: {} for t in s.tasks} for name in methods}
    prompt_tokens: dict = {t: {} for t in s.tasks}
    not_fit: dict[str, list[str]] = {}
    samples = []
    bar = tqdm(total=len(s.tasks) * len(s.lengths) * s.samples * len(methods), desc="ruler", disable=not progress)
    for task in s.tasks:
        for length in s.lengths:
            bar.set_postfix_str(f"{task} {length}: building")
            with timer("build"):
                prompts = [builder.prompt(task, length, i) for i in range(s.samples)]
            prompt_tokens[task][str(length)] = mean([len(p.prefix) + len(p.body) for p in prompts])
            requests = [window_request(p.prefix, p.body, s.decoder_tokens) for p in prompts]
            for name, method in methods.items():
                bar.set_postfix_str(f"{task} {length}: {name}")
                outs = _generate(method, requests, s.new_tokens(task), stops, s.batch_size, timer, bar.update)
                cell = []
                for i, (p, out) in enumerate(zip(prompts, outs)):
                    if out is None:
                        continue
                    prediction = tokenizer.decode(out, skip_special_tokens=True).strip()
                    cell.append(100 * METRICS[p.sample.metric](prediction, p.sample.answers))
                    # every answer, to read what a miss answers instead (a few KB per cell)
                    samples.append({"task": task, "length": length, "method": name, "index": i,
                                    "answers": p.sample.answers, "prediction": prediction, "score": cell[-1],
                                    "depths": p.sample.depths})
                if len(cell) < len(prompts):
                    not_fit.setdefault(name, []).append(f"{task}@{length}")
                scores[name][task][str(length)] = mean(cell) if cell else None
            if after_cell is not None:
                after_cell(_summary(scores, s, builder, prompt_tokens, not_fit, samples))
    bar.close()
    return _summary(scores, s, builder, prompt_tokens, not_fit, samples)


def _summary(scores: dict, s: RulerSettings, builder: PromptBuilder, prompt_tokens: dict, not_fit: dict,
             samples: list) -> dict:
    results = {}
    for name in scores:
        average = {}
        for length in s.lengths:
            cells = [scores[name][t].get(str(length)) for t in s.tasks]
            average[length] = None if any(v is None for v in cells) else mean(cells)
        full = {t: {str(n): scores[name][t].get(str(n)) for n in s.lengths} for t in s.tasks}
        results[name] = {"scores": full, "average": {str(k): v for k, v in average.items()},
                         "effective_length": effective_length(average, s.threshold)}
    return {"methods": results, "tasks": s.tasks, "lengths": s.lengths, "threshold": s.threshold,
            "decoder_tokens": s.decoder_tokens, "samples_per_cell": s.samples,
            "max_new_tokens": {t: s.new_tokens(t) for t in s.tasks}, "haystack": builder.haystack.name,
            "haystack_size": {f"{t}@{n}": v for (t, n), v in builder.sizes.items()},
            "prompt_tokens": prompt_tokens, "does_not_fit": not_fit, "samples": samples}


def short_length(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def table(result: dict) -> tuple[list[str], list[list]]:
    """Rows (method, task) and (method, average), a column per length (scores 0-100)."""
    lengths = [str(n) for n in result["lengths"]]
    header = ["method", "task", *(short_length(n) for n in result["lengths"])]
    rows = []
    for name, r in result["methods"].items():
        rows += [[name, t, *(r["scores"][t][n] for n in lengths)] for t in result["tasks"]]
        rows.append([name, "average", *(r["average"][n] for n in lengths)])
    return header, rows


def note(result: dict) -> str:
    """The effective length of each method, under the table."""
    below = "< " + short_length(min(result["lengths"]))
    parts = [f"{n} " + (short_length(r["effective_length"]) if r["effective_length"] else
                        below if any(v is not None for v in r["average"].values()) else "- (did not fit)")
             for n, r in result["methods"].items()]
    return (f"effective length (longest length whose average over the {len(result['tasks'])} tasks is above "
            f"{result['threshold']}): " + ", ".join(parts))
