"""Does the question's wording decide how many values an adapter lists on RULER's multi-value?

The same RULER multi-value samples (noise haystack, 4 values of one key), asked in RULER's words and
in the facts builder's own short forms, and in a wording the builder never uses; greedy answers,
values found per answer. CPU fp32, full attention. Results: docs/results_general_stage21.md.

    python3 scripts/question_wording.py --adapter A --length 2048 --samples 4 --out wording.json
"""

import argparse
import json
import re

import torch

from cepe.data.pipeline import tokenizer_bos
from cepe.evaluation.methods import Cepe
from cepe.evaluation.tasks.common import encode, window_request
from cepe.evaluation.tasks.ruler import PromptBuilder
from cepe.model.loading import load_model

# {k}: the sample's key. None: RULER's own question
WORDINGS = {
    "ruler": None,
    "ruler, ending in ':'": "\nWhat are all the special magic numbers for {k} mentioned in the provided text? "
                            "The special magic numbers for {k} mentioned in the provided text are:",
    "facts: All ... mentioned above:": "\nAll special magic numbers of {k} mentioned above:",
    "facts: Q/A": "\nQ: Which special magic numbers does {k} have?\nA:",
    # one of the builder's longer forms (`facts.question_styles`): did a stage trained on them learn them?
    "facts more: Collect every ... are": "\nCollect every special magic number of {k} stated anywhere above. "
                                         "The special magic numbers of {k} are",
    # in neither the builder's short nor its longer forms (`facts.question_styles`): generality
    "unseen: Name every ... Answer:": "\nName every special magic number that belongs to {k}.\nAnswer:",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--wordings", help="comma-separated prefixes of the wordings to ask (default: all)")
    ap.add_argument("--out")
    args = ap.parse_args()
    asked = {n: w for n, w in WORDINGS.items()
             if not args.wordings or any(n.startswith(p.strip()) for p in args.wordings.split(","))}
    if not asked:
        ap.error(f"--wordings {args.wordings!r} matches none of: {', '.join(WORDINGS)}")
    torch.set_num_threads(args.threads)
    model = load_model(adapter=args.adapter, dtype=torch.float32, device="cpu").eval()
    tok, builder = model.tokenizer, PromptBuilder(model.tokenizer)
    method = Cepe(model).reading_bos(tokenizer_bos(tok))  # the evaluation's layout, context and decoding
    found: dict[str, list[int]] = {}
    for name, wording in asked.items():
        for i in range(args.samples):
            p = builder.prompt("niah_multivalue", args.length, i)
            body = p.body
            if wording is not None:
                key = re.search(r"magic numbers for ([\w-]+) mentioned", p.sample.question).group(1)
                body = encode(tok, p.sample.context) + encode(tok, wording.format(k=key))
            with torch.no_grad():
                text = tok.decode(method.generate(window_request(p.prefix, body, 512), args.new_tokens))
            found.setdefault(name, []).append(sum(a in text for a in p.sample.answers))
            print(f"{name} | sample {i}: {found[name][-1]} of {len(p.sample.answers)} | {text[:70]!r}", flush=True)
    for name, n in found.items():
        print(f"{name:36s} values found per answer {n}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"adapter": args.adapter, "length": args.length, "found": found}, f, indent=1)


if __name__ == "__main__":
    main()
