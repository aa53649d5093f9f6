"""Why do an adapter's RULER lists stop early (multi-value, vt): nothing more readable, or a habit of stopping?

For each sample of a `cepe eval ruler` result: the answer's first line (the values it listed) is
teacher-forced after the prompt; then (a) the probability of the line's end ("\\n") against the
probability of going on at that point, and (b) the list forced to go on with " " and decoded
greedily for a few tokens: is the next item (a 5+ digit value; a 5-letter variable name for vt)
one the answer missed, one it already listed, or none of the sample's? Fp32 on the CPU, with the
result's cross-attention top-k. Results: docs/results_general_stage21.md.

    python3 scripts/list_continuation.py --adapter A --answers ruler_smollm2.json --samples 0 1 2 3 --out cont.json
"""

import argparse
import json
import re
from dataclasses import replace

import torch

from cepe.data.pipeline import tokenizer_bos
from cepe.evaluation.methods import Cepe
from cepe.evaluation.tasks.common import encode, window_request
from cepe.evaluation.tasks.ruler import PromptBuilder
from cepe.model.loading import load_model

LENGTH = 16384
ITEM = {"niah_multivalue": r"\d{5,}", "vt": r"\b[A-Z]{5}\b"}  # RULER's values and variable names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--answers", required=True, help="a `cepe eval ruler` result with the same haystacks")
    ap.add_argument("--samples", type=int, nargs="+", required=True)
    ap.add_argument("--task", choices=sorted(ITEM), default="niah_multivalue")
    ap.add_argument("--topk", default="from-answers", help="cross-attention top-k: a number, off, or from-answers")
    ap.add_argument("--join", help='rewrite the listed items joined by this (e.g. ", "), and go on with it: does '
                    "the stop follow the separator?")
    ap.add_argument("--new-tokens", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ref = json.load(open(args.answers))
    topk = ref["config"].get("cross_attn_topk") if args.topk == "from-answers" else \
        (None if args.topk == "off" else int(args.topk))
    model = load_model(adapter=args.adapter, dtype=torch.float32, device="cpu").eval()
    model.config.cross_attn_topk = topk
    tok = model.tokenizer
    method = Cepe(model).reading_bos(tokenizer_bos(tok))  # the evaluation's layout, context and decoding
    builder = PromptBuilder(tok)
    task = args.task
    builder.reuse_sizes(ref["results"])
    answered = {s["index"]: s for s in ref["results"]["samples"] if s["task"] == task}
    newline = encode(tok, "\n")
    rows = []
    for i in args.samples:
        prompt = builder.prompt(task, LENGTH, i)
        answers = prompt.sample.answers
        line = answered[i]["prediction"].split("\n")[0].rstrip()
        listed = [a for a in answers if a in line]
        go_on = " "  # after "V1. V2."
        if args.join:
            line = args.join.join(sorted(listed, key=line.index))
            go_on = args.join
        request = window_request(prompt.prefix, prompt.body, 512)
        answered_line = replace(request, tokens=list(request.tokens) + encode(tok, " " + line))
        cont = encode(tok, go_on)
        with torch.no_grad():  # the method encodes the context once per sample and reuses it
            p = method.log_probs(answered_line, 1)[0].exp()
            more_ids = cont + method.generate(replace(answered_line, tokens=answered_line.tokens + cont),
                                              args.new_tokens)
        ranked = [(tok.decode([int(t)]), round(float(p[t]), 4)) for t in p.topk(5).indices]
        p_end = round(float(p[newline[0]]), 3) if len(newline) == 1 else None
        p_on = round(float(p[cont[0]]), 3)
        more = tok.decode(more_ids)
        nxt = re.findall(ITEM[task], more)
        kind = "none" if not nxt else "missed" if nxt[0] in answers and nxt[0] not in listed else \
            "listed again" if nxt[0] in listed else "not a needle's"
        rows.append({"index": i, "answers": answers, "line": line, "listed": len(listed), "p_end": p_end,
                     "p_go_on": p_on, "top5": ranked, "forced": more, "next_value": kind})
        print(f"sample {i}: listed {len(listed)}/{len(answers)} {line!r}; p(end) {p_end}, p({go_on!r}) {p_on}, "
              f"top {ranked[:3]}; forced on: {more!r} -> {kind}", flush=True)
    kinds = [r["next_value"] for r in rows if r["listed"] < len(r["answers"])]
    print(f"short lists {len(kinds)}: forced next value " +
          ", ".join(f"{k} {kinds.count(k)}" for k in ("missed", "listed again", "not a needle's", "none")))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"adapter": args.adapter, "task": task, "topk": topk, "join": args.join, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
