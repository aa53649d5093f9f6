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

from dataclasses import dataclass
from typing import Any

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
    text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    head, tail = text.split(_MARK)
    return head, tail


def make_request(method: Method, head: list[int], tail: list[int], passages: list[list[int]], scores: list[float],
                 s: QaSettings, max_new_tokens: int) -> tuple[Request, int]:
    """Request and number of passages read; `passages` are formatted decoder ids, best first."""
    m = s.decoder_passages
    if isinstance(method, (Cepe, Truncated)):
        in_decoder = [t for p in passages[:m] for t in p]
        context = passages[m:] if isinstance(method, Cepe) else []
        return Request(tokens=in_decoder + tail, context=context, prefix=head, score_start=1), min(m, len(passages)) + len(context)
    if isinstance(method, Replug):
        return Request(tokens=tail, context=passages, prefix=head, weights=scores, score_start=1), len(passages)
    if in_window(method):
        kept = fitting_prefix(passages, window_budget(method, len(head) + len(tail) + max_new_tokens))
        return Request(tokens=tail, context=kept, prefix=head, score_start=1), len(kept)
    raise ValueError(f"qa: no layout for method {method.name!r}")


def run(methods: dict[str, Method], questions: list[dict], passages: list[dict], retriever, s: QaSettings,
        tokenizer: Any, timer: Timer | None = None, progress: bool = True) -> dict:
    """questions: {question, answers, gold_passage?}; passages: {id, text} (the retriever's pool, same order)."""
    timer = timer or Timer()
    n_ret = s.decoder_passages + s.encoder_passages
    stops = stop_ids(tokenizer, newline=False)  # the answer may follow "The answer is:" on the next line
    formatted: dict[int, list[int]] = {}
    scores = {name: {"em": [], "f1": [], "substring": [], "passages_read": []} for name in methods}
    recall = {"decoder": [], "all": []}
    examples = []
    for q in tqdm(questions, desc="qa", disable=not progress):
        with timer("retrieval"):
            hits = retriever.search(q["question"], n_ret) if n_ret else []
        for i, _ in hits:
            if i not in formatted:
                formatted[i] = encode(tokenizer, format_passage(passages[i]["text"]))
        docs = [formatted[i] for i, _ in hits]
        gold = q.get("gold_passage")
        if gold is not None:
            ids = [passages[i]["id"] for i, _ in hits]
            recall["decoder"].append(float(gold in ids[: s.decoder_passages]))
            recall["all"].append(float(gold in ids))
        head_text, tail_text = prompt_parts(tokenizer, q["question"], s.prompt)
        head, tail = encode(tokenizer, head_text), encode(tokenizer, tail_text)
        row = {"question": q["question"], "answers": q["answers"], "retrieved": [passages[i]["id"] for i, _ in hits]}
        for name, method in methods.items():
            req, n_read = make_request(method, head, tail, docs, [sc for _, sc in hits], s, s.max_new_tokens)
            with timer(name):
                out = method.generate(req, s.max_new_tokens, stops)
            generated = tokenizer.decode(out, skip_special_tokens=True)
            answer = clean_answer(generated)
            row[name], row[f"{name}_generated"] = answer, generated
            scores[name]["em"].append(exact_match(answer, q["answers"]))
            scores[name]["f1"].append(f1_score(answer, q["answers"]))
            scores[name]["substring"].append(substring_match(answer, q["answers"]))
            scores[name]["passages_read"].append(n_read)
        examples.append(row)
    results = {name: {k: mean(v) for k, v in sc.items()} for name, sc in scores.items()}
    return {
        "methods": results,
        "retrieval_recall": {f"gold@{s.decoder_passages}": mean(recall["decoder"]), f"gold@{n_ret}": mean(recall["all"])},
        "examples": examples,
    }


def table(result: dict) -> tuple[list[str], list[list]]:
    header = ["method", "EM", "F1", "substring", "passages read"]
    rows = [[n, r["em"], r["f1"], r["substring"], r["passages_read"]] for n, r in result["methods"].items()]
    return header, rows
