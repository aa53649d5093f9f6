"""Open-domain QA: retrieve passages for each question; the top m go in the decoder's prompt and
the next k in CEPE's encoder (one passage per chunk); answer greedily; exact match, F1 and
answer-substring match.

Layouts (passages best first, each formatted as `Document: <text>` + blank line):
- `cepe`: decoder gets the top m and the question, the encoder the passages m+1..m+k;
- `truncated`: the same decoder prompt, no encoder (what CEPE's decoder sees alone);
- `full` (decoder only): as many of the top m+k as fit its window, all in the prompt;
- `replug`: one pass per passage of the top m+k, the question after it, distributions mixed;
- `streamingllm`: all m+k passages in the prompt, read with sinks + recent window.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..methods import Cepe, Method, Replug, Truncated
from ..metrics import clean_answer, exact_match, f1_score, substring_match
from ..report import Timer
from ..scoring import Request
from .common import encode, fitting_prefix, in_window, mean, stop_ids, window_budget

INSTRUCTION = "Answer the question with a short answer, using the documents."
_MARK = "\u0000DOCUMENTS\u0000"


@dataclass
class QaSettings:
    decoder_passages: int = 1  # m
    encoder_passages: int = 10  # k
    prompt: str = "chat"  # chat | plain
    max_new_tokens: int = 16

    def __post_init__(self):
        if self.decoder_passages < 0 or self.encoder_passages < 0:
            raise ValueError("passage counts must be >= 0")
        if self.prompt not in ("plain", "chat"):
            raise ValueError(f"prompt must be 'plain' or 'chat', got {self.prompt!r}")


def format_passage(text: str) -> str:
    return f"Document: {text.strip()}\n\n"


def prompt_parts(tokenizer: Any, question: str, style: str) -> tuple[str, str]:
    """(head, tail) text around the documents. plain: `<docs>Question: q\\nAnswer:`;
    chat: the tokenizer's chat template with the documents and question in the user turn."""
    if style == "plain":
        return "", f"Question: {question.strip()}\nAnswer:"
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template: use --prompt plain")
    user = f"{INSTRUCTION}\n\n{_MARK}Question: {question.strip()}"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    head, tail = text.split(_MARK)
    return head, tail


def make_request(method: Method, head: list[int], tail: list[int], passages: list[list[int]], scores: list[float],
                 s: QaSettings, max_new_tokens: int) -> tuple[Request, int]:
    """Request and number of passages read; `passages` are formatted decoder ids, best first."""
    m = s.decoder_passages
    if isinstance(method, (Cepe, Truncated)):
        in_decoder = [t for p in passages[:m] for t in p]
        context = passages[m:] if isinstance(method, Cepe) else []
        request = Request(tokens=in_decoder + tail, context=context, prefix=head, score_start=1)
        return request, min(m, len(passages)) + len(context)
    if isinstance(method, Replug):
        return Request(tokens=tail, context=passages, prefix=head, weights=scores, score_start=1), len(passages)
    if in_window(method):
        kept = fitting_prefix(passages, window_budget(method, len(head) + len(tail) + max_new_tokens))
        return Request(tokens=tail, context=kept, prefix=head, score_start=1), len(kept)
    raise ValueError(f"qa: no layout for method {method.name!r}")


def run(methods: dict[str, Method], questions: list[dict], passages: list[dict], retriever, s: QaSettings,
        tokenizer: Any, timer: Timer | None = None, progress: bool = True, batch_size: int = 1,
        keep_examples: int | None = None, reuse: dict | None = None, max_batch_tokens: int | None = None) -> dict:
    """questions: {question, answers, gold_passage?}; passages: {id, text} (the retriever's pool, same order).

    Each method answers up to `batch_size` questions per `generate_batch` call, and at most
    `max_batch_tokens` padded decoder tokens (REPLUG counts every pass; questions sorted by
    length, so a batch pads little). `keep_examples`: how many per-question rows go in the result
    (None: all). `reuse`: answers of methods that ignore the encoder context and so do not depend
    on k, shared between runs of a k sweep (`{name: [tokens, ...]}`, filled here)."""
    timer = timer or Timer()
    n_ret = s.decoder_passages + s.encoder_passages
    stops = stop_ids(tokenizer, newline=False)  # the answer may follow "The answer is:" on the next line
    formatted: dict[int, list[int]] = {}
    recall = {"decoder": [], "all": []}
    prepared = []  # (head, tail, docs, scores, passage ids) per question
    for q in tqdm(questions, desc=f"qa: retrieve top {n_ret}", disable=not progress):
        with timer("retrieval"):
            hits = retriever.search(q["question"], n_ret) if n_ret else []
        for i, _ in hits:
            if i not in formatted:
                formatted[i] = encode(tokenizer, format_passage(passages[i]["text"]))
        gold = q.get("gold_passage")
        if gold is not None:
            ids = [passages[i]["id"] for i, _ in hits]
            recall["decoder"].append(float(gold in ids[: s.decoder_passages]))
            recall["all"].append(float(gold in ids))
        head_text, tail_text = prompt_parts(tokenizer, q["question"], s.prompt)
        prepared.append((encode(tokenizer, head_text), encode(tokenizer, tail_text), [formatted[i] for i, _ in hits],
                         [sc for _, sc in hits], [passages[i]["id"] for i, _ in hits]))
    examples = [
        {"question": q["question"], "answers": q["answers"], "retrieved": p[4]} for q, p in zip(questions, prepared)
    ]
    results = {}
    for name, method in methods.items():
        made = [
            make_request(method, head, tail, docs, scores, s, s.max_new_tokens)
            for head, tail, docs, scores, _ in prepared
        ]
        cached = reuse.get(name) if reuse is not None and not method.reads_context else None
        if cached is not None and len(cached) == len(made):
            outs = cached
        else:
            outs = _generate_all(method, [r for r, _ in made], s.max_new_tokens, stops, batch_size, timer, progress,
                                 max_batch_tokens)
            if reuse is not None and not method.reads_context:
                reuse[name] = outs
        sc = {"em": [], "f1": [], "substring": [], "passages_read": []}
        for q, row, out, (_, n_read) in zip(questions, examples, outs, made):
            generated = tokenizer.decode(out, skip_special_tokens=True)
            answer = clean_answer(generated)
            row[name], row[f"{name}_generated"] = answer, generated
            sc["em"].append(exact_match(answer, q["answers"]))
            sc["f1"].append(f1_score(answer, q["answers"]))
            sc["substring"].append(substring_match(answer, q["answers"]))
            sc["passages_read"].append(n_read)
        results[name] = {k: mean(v) for k, v in sc.items()}
        # per-question hits, for paired comparisons between methods
        results[name]["substring_hits"] = "".join("1" if h else "0" for h in sc["substring"])
    return {
        "methods": results,
        "retrieval_recall": {
            f"gold@{s.decoder_passages}": mean(recall["decoder"]),
            f"gold@{n_ret}": mean(recall["all"]),
        },
        "examples": examples if keep_examples is None else examples[:keep_examples],
    }


def batches(lengths: list[int], rows: list[int], max_count: int, max_tokens: int | None) -> list[list[int]]:
    """Indices grouped into batches, longest first: at most `max_count` requests and (when
    given) at most `max_tokens` padded decoder tokens (rows in the batch x its longest row) per
    batch; a request over the budget on its own gets a batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    cur: list[int] = []
    cur_rows = 0
    for i in order:
        longest = lengths[cur[0]] if cur else lengths[i]  # sorted: the first is the longest
        fits = len(cur) < max(1, max_count) and (max_tokens is None or (cur_rows + rows[i]) * longest <= max_tokens)
        if cur and not fits:
            out.append(cur)
            cur, cur_rows = [], 0
        cur.append(i)
        cur_rows += rows[i]
    if cur:
        out.append(cur)
    return out


def _generate_all(method: Method, requests: list[Request], max_new_tokens: int, stops, batch_size: int,
                  timer: Timer, progress: bool, max_batch_tokens: int | None = None) -> list[list[int]]:
    """Every request's answer, in batches from `batches` (longest first); returned in input order."""
    lengths = [method.decoder_length(r) + max_new_tokens for r in requests]
    groups = batches(lengths, [method.decoder_rows(r) for r in requests], batch_size, max_batch_tokens)
    outs: list[list[int] | None] = [None] * len(requests)
    bar = tqdm(total=len(requests), desc=f"qa: {method.name}", disable=not progress)
    for idx in groups:
        with timer(method.name):
            for i, out in zip(idx, method.generate_batch([requests[i] for i in idx], max_new_tokens, stops)):
                outs[i] = out
        bar.update(len(idx))
    bar.close()
    return outs


def run_sweep(methods: dict[str, Method], questions: list[dict], passages: list[dict], retriever, s: QaSettings,
              ks: list[int], tokenizer: Any, timer: Timer | None = None, progress: bool = True, batch_size: int = 1,
              keep_examples: int | None = None, max_batch_tokens: int | None = None,
              after_k: Callable[[dict], None] | None = None) -> dict:
    """`run` for each number of encoder passages k in `ks` (m fixed); methods that ignore the
    context answer once. Returns {"k": {k: run's result}, "comparison": `compare`'s}.
    `after_k`, if given, gets the sweep so far after every k (to save partial results)."""
    reuse: dict = {}
    by_k = {}
    for k in ks:
        by_k[str(k)] = run(methods, questions, passages, retriever, replace(s, encoder_passages=k), tokenizer, timer,
                           progress, batch_size, keep_examples, reuse, max_batch_tokens)
        if after_k is not None and len(by_k) < len(ks):
            after_k({"k": dict(by_k), "comparison": compare(by_k)})
    return {"k": by_k, "comparison": compare(by_k)}


def merge(sweeps: list[dict]) -> dict:
    """One sweep from several sweeps' results over the same questions (e.g. k = 1,5 and k = 10,20
    run apart): their k's must not overlap; the comparison is recomputed over all of them. Sorted by k."""
    by_k: dict = {}
    for sweep in sweeps:
        for k, res in sweep["k"].items():
            if k in by_k:
                raise ValueError(f"k = {k} is in more than one of the sweeps")
            by_k[k] = res
    sizes = {len(r["substring_hits"]) for res in by_k.values() for r in res["methods"].values()}
    if len(sizes) > 1:
        raise ValueError(f"the sweeps are over different numbers of questions: {sorted(sizes)}")
    by_k = dict(sorted(by_k.items(), key=lambda kv: int(kv[0])))
    return {"k": by_k, "comparison": compare(by_k)}


def merge_files(files: list[str]) -> dict:
    """`cepe eval qa-merge`: the results files of QA runs of one setting over the same questions
    (sweeps run apart, or one-k runs) joined into one sweep. Returns the merged file's parts:
    {config, data, results, timings, environment, model, partial (the inputs marked partial)}."""
    runs = []
    for f in files:
        try:
            runs.append(json.loads(Path(f).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{f}: not a readable results file ({e})") from None
        if runs[-1].get("task") != "qa":
            raise ValueError(f"{f}: not a QA result (task {runs[-1].get('task')!r})")
    first = runs[0]
    same = {
        "questions": lambda r: r["data"]["questions"]["sha256"],
        "passages": lambda r: r["data"]["passages"]["sha256"],
        "number of questions": lambda r: r["data"]["examples"],
        "model": lambda r: r.get("model"),
        **{
            key: (lambda r, key=key: r["config"].get(key))
            for key in ("decoder_passages", "prompt", "max_new_tokens", "retriever", "max_passages", "full_window")
        },
    }
    for what, get in same.items():
        for f, r in zip(files[1:], runs[1:]):
            if get(r) != get(first):
                raise ValueError(f"{f} and {files[0]} differ in {what}: {get(r)!r} vs {get(first)!r}")
    # a one-k run's results are one entry of a sweep
    result = merge(
        [
            r["results"] if "k" in r["results"] else {"k": {str(r["config"]["encoder_passages"][0]): r["results"]}}
            for r in runs
        ]
    )
    partial = [f for f, r in zip(files, runs) if r["data"].get("partial")]
    timings: dict = {}
    for r in runs:
        for k, v in r["timings"].items():
            timings[k] = round(timings.get(k, 0.0) + v, 2)
    config = {**first["config"], "encoder_passages": [int(k) for k in result["k"]], "merged_from": list(files)}
    data = {
        **{k: v for k, v in first["data"].items() if k != "partial"},
        **({"partial_inputs": partial} if partial else {}),
    }
    return {"config": config, "data": data, "results": result, "timings": timings, "environment": first["environment"],
            "model": first.get("model"), "partial": partial}


def sweep_note(result: dict) -> str:
    """Lines under a sweep's table: the best decoder-only setting and each encoder method against it."""
    cmp = result["comparison"]
    best = cmp["best_decoder_only"]
    head = (
        f"best decoder-only: {best['setting']} ({best['substring']:.3f})"
        if best["setting"]
        else "no decoder-only method"
    )
    return "\n".join(
        [head]
        + [
            f"{key} - best: {v['minus_best']:+.3f} (95% CI {v['ci95'][0]:+.3f} .. {v['ci95'][1]:+.3f})"
            for key, v in cmp.items()
            if key != "best_decoder_only"
        ]
    )


DECODER_ONLY = ("truncated", "full", "streamingllm")


def compare(by_k: dict) -> dict:
    """CEPE (and any other encoder method) against the best decoder-only setting over every k
    (substring match), with a paired bootstrap 95% interval of the difference."""
    best, best_hits, best_at = None, None, None
    for k, res in by_k.items():
        for name, r in res["methods"].items():
            if name.split("-")[0] in DECODER_ONLY and (best is None or r["substring"] > best):
                best, best_hits, best_at = r["substring"], r["substring_hits"], f"{name}@k={k}"
    out = {"best_decoder_only": {"setting": best_at, "substring": best}}
    if best_hits is None:
        return out
    for k, res in by_k.items():
        for name, r in res["methods"].items():
            if name.split("-")[0] in DECODER_ONLY:
                continue
            diff, lo, hi = paired_difference(r["substring_hits"], best_hits)
            out[f"{name}@k={k}"] = {"substring": r["substring"], "minus_best": diff, "ci95": [lo, hi]}
    return out


def paired_difference(a: str, b: str, samples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b over paired 0/1 outcomes (strings of '0'/'1', one per question) and a
    bootstrap 95% interval (questions resampled with replacement)."""
    x = torch.tensor([int(i) - int(j) for i, j in zip(a, b)], dtype=torch.float64)
    if not len(x):
        return float("nan"), float("nan"), float("nan")
    g = torch.Generator().manual_seed(seed)
    means = x[torch.randint(len(x), (samples, len(x)), generator=g)].mean(dim=1)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return float(x.mean()), lo, hi


def table(result: dict) -> tuple[list[str], list[list]]:
    """One row per method, or per (k, method) for a sweep."""
    header = ["method", "EM", "F1", "substring", "passages read"]
    if "k" in result:
        rows = [[k, n, r["em"], r["f1"], r["substring"], r["passages_read"]]
                for k, res in result["k"].items() for n, r in res["methods"].items()]
        return ["k", *header], rows
    rows = [[n, r["em"], r["f1"], r["substring"], r["passages_read"]] for n, r in result["methods"].items()]
    return header, rows
