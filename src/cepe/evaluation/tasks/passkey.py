"""Passkey retrieval: a random number hidden at a chosen depth of long filler text; the model must
repeat it. Accuracy against prompt length and needle depth.

The short instruction that opens the prompt is kept in every method's decoder (the request's
prefix), so that what is measured is finding the key, not knowing the task. The rest is laid out
like a `ppl` window: its last D tokens (which end with the question) are the decoder window,
everything before is context (CEPE's encoder, REPLUG's passes, or the window of `full` /
`streamingllm`); `truncated` sees the instruction and the last D tokens only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from ..methods import DoesNotFit, Method
from ..metrics import first_integer
from ..report import Timer
from ..scoring import Request
from .common import encode, mean, stop_ids, window_request

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.\n\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclass
class PasskeySettings:
    lengths: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = 2
    decoder_tokens: int = 256  # D
    # a long filler (a book) read from the start at every trial gave every trial of a length the same
    # decoder window, so one window's reading decided a whole column (stage 6's 4K): each trial now
    # starts at its own sentence (drawn from a second generator, so the keys stay those of `seed`)
    vary_start: bool = True
    max_new_tokens: int = 8
    seed: int = 0

    def __post_init__(self):
        if any(not 0 <= d <= 1 for d in self.depths):
            raise ValueError(f"depths must be in [0, 1], got {self.depths}")
        if self.trials < 1:
            raise ValueError("trials must be >= 1")


def build_prompt(
    tokenizer: Any, length: int, depth: float, key: str, filler: str = FILLER, start: float = 0.0
) -> tuple[list[int], list[int]]:
    """(instruction, body) of about `length` tokens in all: the body is filler with the needle at
    `depth`, then the question. A short filler (the built-in sentences) is repeated in whole units,
    the needle between two of them; a long one (a book) is read from the sentence that starts at
    about `start` (a fraction of the book) for as many tokens as the length needs (cycling if it is
    too short), the needle at the sentence end nearest the depth."""
    intro, needle, question = (
        encode(tokenizer, INTRO),
        encode(tokenizer, NEEDLE.format(key=key)),
        encode(tokenizer, QUESTION),
    )
    unit = encode(tokenizer, filler)
    if not unit:
        raise ValueError("empty filler text")
    room = max(0, length - len(intro) - len(needle) - len(question))
    if 2 * len(unit) <= room:
        units = room // len(unit)
        at = round(depth * units)
        return intro, unit * at + needle + unit * (units - at) + question
    begin = sentence_end_before(tokenizer, unit, round(start * len(unit))) if start > 0 else 0
    hay = ((unit[begin:] + unit[:begin]) * (room // len(unit) + 1))[:room]
    at = sentence_end_before(tokenizer, hay, round(depth * room))
    return intro, hay[:at] + needle + hay[at:] + question


def sentence_end_before(tokenizer: Any, ids: list[int], at: int, reach: int = 128) -> int:
    """The position after the last token ending a sentence in ids[at - reach : at] (else `at`), so a
    needle in running text starts a sentence."""
    for i in range(at, max(0, at - reach), -1):
        piece = tokenizer.decode(ids[i - 1 : i])
        if piece.rstrip().endswith((".", "!", "?")) or piece.endswith("\n"):
            return i
    return at


def make_request(intro: list[int], body: list[int], s: PasskeySettings) -> Request:
    return window_request(intro, body, s.decoder_tokens)


def run(methods: dict[str, Method], s: PasskeySettings, tokenizer: Any, filler: str = FILLER,
        timer: Timer | None = None, progress: bool = True) -> dict:
    timer = timer or Timer()
    rng, starts = random.Random(s.seed), random.Random(s.seed + 1)
    stops = stop_ids(tokenizer)
    hits = {name: {(length, depth): [] for length in s.lengths for depth in s.depths} for name in methods}
    prompt_tokens = {}
    samples = []
    total = len(s.lengths) * len(s.depths) * s.trials * len(methods)
    bar = tqdm(total=total, desc="passkey", disable=not progress)
    for length in s.lengths:
        for depth in s.depths:
            for _ in range(s.trials):
                key = str(rng.randint(10000, 99999))
                start = starts.random() if s.vary_start else 0.0
                intro, body = build_prompt(tokenizer, length, depth, key, filler, start)
                prompt_tokens[length] = len(intro) + len(body)
                req = make_request(intro, body, s)
                for name, method in methods.items():
                    bar.set_postfix_str(f"{name} L={length} depth={depth}")
                    try:
                        with timer(name):
                            out = method.generate(req, s.max_new_tokens, stops)
                    except DoesNotFit:
                        bar.update()
                        continue
                    answer = tokenizer.decode(out, skip_special_tokens=True)
                    hit = first_integer(answer) == key
                    hits[name][(length, depth)].append(float(hit))
                    # every answer (a few tokens each), as RULER keeps them: a miss at 64K is read
                    # from the file, not re-run
                    samples.append({"method": name, "length": length, "depth": depth, "key": key,
                                    "start": round(start, 4), "answer": answer, "correct": hit})
                    bar.update()
    bar.close()
    results = {}
    for name in methods:
        grid = [[mean(hits[name][(length, depth)]) for length in s.lengths] for depth in s.depths]
        by_length = {
            str(length): mean([v for depth in s.depths for v in hits[name][(length, depth)]]) for length in s.lengths
        }
        results[name] = {"accuracy_by_length": by_length, "grid_depth_by_length": grid,
                         "accuracy": mean([v for cell in hits[name].values() for v in cell])}
    return {"methods": results, "lengths": s.lengths, "depths": s.depths,
            "prompt_tokens": {str(k): v for k, v in prompt_tokens.items()}, "samples": samples}


def table(result: dict) -> tuple[list[str], list[list]]:
    lengths = [str(x) for x in result["lengths"]]
    header = ["method \\ length"] + lengths + ["all"]
    rows = [[n, *(r["accuracy_by_length"][x] for x in lengths), r["accuracy"]] for n, r in result["methods"].items()]
    return header, rows
