"""In-context classification: N demonstrations, the last few in the decoder's prompt and the rest
in CEPE's encoder; the label is the candidate with the highest
log-likelihood, raw (sum) or length-normalised (mean per token), and calibrated: each label's raw
log-likelihood minus what the same prompt gives it for a content-free input (`CONTENT_FREE`; Zhao
et al. 2021, "Calibrate Before Use"), so a prior toward one label (a model that answers one label
for every input) is told apart from reading the demonstrations. Raw accuracy stays the headline.

Demonstrations are sampled once per seed from the examples not under test, so every test example
and method sees the same ones; `demo_seed` draws other sets for the same test set, and
`run_demo_seeds` (`--demo-seeds`) reports the mean over several. Layouts:
- `cepe`: encoder gets demos[:N-n] (default packed: laid end to end and cut into chunks; or one
  demonstration per chunk), decoder demos[N-n:] + the query;
- `truncated`: the decoder's n demos + the query only;
- `full` (decoder alone): as many of the N demos as fit its window (the last ones), + the query;
- `replug`: one pass per encoder demo, the decoder demos + query after it;
- `streamingllm`: all N demos + the query, sinks + recent window.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

from tqdm.auto import tqdm

from ..methods import Cepe, Method, Replug, Truncated
from ..metrics import accuracy
from ..report import Timer
from ..scoring import Request, label_log_likelihoods
from .common import encode, fitting_prefix, in_window, mean, window_budget


@dataclass
class IclSettings:
    demos: int = 32  # N
    decoder_demos: int = 2  # n
    seed: int = 0
    encoder_layout: str = "packed"  # packed: the N - n demos as one text, cut into chunks | per-demo: a chunk each
    # the demonstrations' own draw from the examples outside the test set (None: the test set's
    # order); several of them measure several demonstration sets on one test set (`run_demo_seeds`)
    demo_seed: int | None = None

    def __post_init__(self):
        if self.encoder_layout not in ("packed", "per-demo"):
            raise ValueError(f"encoder_layout must be 'packed' or 'per-demo', got {self.encoder_layout!r}")
        if not 0 <= self.decoder_demos <= self.demos:
            raise ValueError(f"decoder demos ({self.decoder_demos}) must be within [0, demos={self.demos}]")


CONTENT_FREE = "N/A"  # the content-free input whose label log-likelihoods are each label's prior


def verbalize(label: str) -> str:
    return str(label).replace("_", " ")


def format_query(text: str) -> str:
    return f"Input: {' '.join(str(text).split())}\nLabel:"


def format_demo(row: dict) -> str:
    return f"{format_query(row['text'])} {verbalize(row['label'])}\n\n"


def split(
    rows: list[dict], s: IclSettings, max_examples: int | None, reserve: int | None = None
) -> tuple[list[dict], list[dict]]:
    """(test examples, demonstrations): the test set from `s.seed`'s shuffle, the demonstrations from
    the rest, reshuffled by `s.demo_seed` if set. `reserve` (>= demos): keep
    that many examples out of the test set, so a sweep over N tests the same examples for every N
    and its demonstration sets are nested."""
    order = list(range(len(rows)))
    random.Random(s.seed).shuffle(order)
    n_test = min(max_examples or len(rows), len(rows) - max(s.demos, reserve or 0))
    if n_test < 1:
        raise ValueError(f"{len(rows)} examples cannot give {s.demos} demonstrations and a test set")
    test = [rows[i] for i in order[:n_test]]
    pool = order[n_test:]
    if s.demo_seed is not None:
        random.Random(s.demo_seed).shuffle(pool)
    demos = [rows[i] for i in pool[: s.demos]]  # a prefix of one pool: nested over N
    return test, demos


def make_request(method: Method, demos: list[list[int]], query: list[int], s: IclSettings,
                 longest_label: int) -> tuple[Request, int]:
    """Prompt request (candidates are appended later) and the number of demonstrations read."""
    n_enc = len(demos) - s.decoder_demos
    in_decoder = [t for d in demos[n_enc:] for t in d]
    if isinstance(method, (Cepe, Truncated, Replug)):
        context = demos[:n_enc] if not isinstance(method, Truncated) else []
        read = len(context) + s.decoder_demos
        if isinstance(method, Cepe) and s.encoder_layout == "packed" and context:
            # one running text, as the adapter saw in training (full chunks of continuous text),
            # instead of one short demonstration padded to a whole chunk
            context = [[t for d in context for t in d]]
        return Request(tokens=in_decoder + query, context=context, score_start=1), read
    if in_window(method):
        # the demonstrations nearest the query are kept first
        kept = fitting_prefix(demos[::-1], window_budget(method, len(query) + longest_label))[::-1]
        return Request(tokens=query, context=kept, score_start=1), len(kept)
    raise ValueError(f"icl: no layout for method {method.name!r}")


def run(methods: dict[str, Method], rows: list[dict], s: IclSettings, tokenizer: Any, max_examples: int | None = None,
        timer: Timer | None = None, progress: bool = True, reserve: int | None = None) -> dict:
    """rows: {text, label}. `reserve`: see `split`."""
    timer = timer or Timer()
    labels = sorted({str(r["label"]) for r in rows})
    if len(labels) < 2:
        raise ValueError(f"need at least two labels, found {labels}")
    test, demos = split(rows, s, max_examples, reserve)
    demo_ids = [encode(tokenizer, format_demo(d)) for d in demos]
    candidates = [encode(tokenizer, " " + verbalize(label)) for label in labels]
    longest = max(len(c) for c in candidates)
    preds = {name: {"raw": [], "normalized": [], "calibrated": [], "demos_read": []} for name in methods}
    prior = {}  # each method's label log-likelihoods after the same demonstrations, content-free input
    free = encode(tokenizer, format_query(CONTENT_FREE))
    for name, method in methods.items():
        free_request, _ = make_request(method, demo_ids, free, s, longest)
        with timer(name):
            prior[name] = [ll for ll, _n in label_log_likelihoods(method, free_request, candidates)]
    gold = []
    for ex in tqdm(test, desc="icl", disable=not progress):
        gold.append(str(ex["label"]))
        query = encode(tokenizer, format_query(ex["text"]))
        for name, method in methods.items():
            req, n_read = make_request(method, demo_ids, query, s, longest)
            with timer(name):
                lls = label_log_likelihoods(method, req, candidates)
            preds[name]["raw"].append(labels[max(range(len(labels)), key=lambda i: lls[i][0])])
            preds[name]["normalized"].append(labels[max(range(len(labels)), key=lambda i: lls[i][0] / lls[i][1])])
            preds[name]["calibrated"].append(
                labels[max(range(len(labels)), key=lambda i: lls[i][0] - prior[name][i])])
            preds[name]["demos_read"].append(n_read)
    results = {
        name: {
            "accuracy_raw": accuracy(p["raw"], gold),
            "accuracy_normalized": accuracy(p["normalized"], gold),
            "accuracy_calibrated": accuracy(p["calibrated"], gold),
            "demos_read": mean(p["demos_read"]),
        }
        for name, p in preds.items()
    }
    majority = max(labels, key=gold.count)
    return {
        "methods": results,
        "labels": labels,
        "majority_baseline": accuracy([majority] * len(gold), gold),
        "test_examples": len(test),
        "predictions": {name: p["raw"] for name, p in preds.items()},
        "predictions_calibrated": {name: p["calibrated"] for name, p in preds.items()},
        "label_prior": prior,
        "gold": gold,
    }


def run_sweep(methods: dict[str, Method], rows: list[dict], s: IclSettings, demos: list[int], tokenizer: Any,
              max_examples: int | None = None, timer: Timer | None = None, progress: bool = True) -> dict:
    """`run` for each number of demonstrations N in `demos` (n in the decoder fixed), on one test
    set: {"demos": {N: run's result}}."""
    out = {}
    for n in sorted(set(demos)):
        out[str(n)] = run(
            methods, rows, replace(s, demos=n), tokenizer, max_examples, timer, progress, reserve=max(demos)
        )
    return {"demos": out}


def run_demo_seeds(methods: dict[str, Method], rows: list[dict], s: IclSettings, demos: list[int],
                   demo_seeds: list[int], tokenizer: Any, max_examples: int | None = None,
                   timer: Timer | None = None, progress: bool = True) -> dict:
    """`run_sweep` once per demonstration set (`demo_seeds`), all on the test set of `s.seed`. One
    set's accuracy depends on the examples it drew (a model that answers one label for every input
    moves with the labels nearest the query), so the mean over sets is the figure:
    {"demos": {N: result with each accuracy the mean over sets, plus `accuracy_raw_by_seed`},
     "demo_seeds": {seed: run_sweep's result}}."""
    if not demo_seeds:
        raise ValueError("demo_seeds is empty")
    by_seed = {str(d): run_sweep(methods, rows, replace(s, demo_seed=d), demos, tokenizer, max_examples, timer,
                                 progress) for d in demo_seeds}
    averaged = {}
    for n, first in next(iter(by_seed.values()))["demos"].items():
        runs = [sweep["demos"][n]["methods"] for sweep in by_seed.values()]
        averaged[n] = {k: first[k] for k in ("labels", "majority_baseline", "test_examples", "gold")}
        averaged[n]["methods"] = {
            name: {**{k: mean([r[name][k] for r in runs]) for k in first["methods"][name]},
                   "accuracy_raw_by_seed": [r[name]["accuracy_raw"] for r in runs]}
            for name in first["methods"]
        }
    return {"demos": averaged, "demo_seeds": by_seed}


def table(result: dict) -> tuple[list[str], list[list]]:
    """One row per method, or per (N, method) for a sweep."""
    header = ["method", "acc (raw)", "acc (length-norm.)", "acc (calibrated)", "demos read"]

    def cells(r: dict) -> list:  # results written before calibration existed have no such column
        calibrated = r.get("accuracy_calibrated", float("nan"))
        return [r["accuracy_raw"], r["accuracy_normalized"], calibrated, r["demos_read"]]

    if "demos" in result:
        rows = [[n, m, *cells(r)] for n, res in result["demos"].items() for m, r in res["methods"].items()]
        return ["N", *header], rows
    rows = [[n, *cells(r)] for n, r in result["methods"].items()]
    return header, rows
