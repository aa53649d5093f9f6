"""Which fact wordings does an adapter retrieve from the encoder when generating freely?

A 5-digit value stated once in 4K tokens of Moby-Dick (bundled, held out of training), at five
depths; the question after it in the decoder's 256-token window. Prints each answer and, per wording,
how often the answer contains the value and how often the first number written is the value (what
`cepe eval passkey` scores). CPU, about a minute per wording:

    python3 scripts/probe_facts.py weights/cepe-smollm2-135m [keyed,keyless,passkey,passkey+intro]
"""

import argparse
from importlib import resources

import torch

from cepe import CepeForCausalLM
from cepe.evaluation.methods import build_methods
from cepe.evaluation.metrics import first_integer
from cepe.evaluation.tasks.common import encode, stop_ids, window_request
from cepe.evaluation.tasks.passkey import INTRO, sentence_end_before

# wording: (the statement in the context, the question ending the decoder window)
CASES = {
    "keyed": ("The access code of Zumaba is {v}.",
              "\n\nWhat is the access code of Zumaba? The access code of Zumaba is"),
    "keyed_q": ("The access code of Zumaba is {v}.", "\n\nQ: What access code does Zumaba have?\nA:"),
    "keyless": ("The ticket number is {v}.", "\n\nWhat is the ticket number? The ticket number is"),
    "passkey": ("The pass key is {v}. Remember it. {v} is the pass key.", "\n\nWhat is the pass key? The pass key is"),
    "passkey+intro": ("The pass key is {v}. Remember it. {v} is the pass key.",
                      "\n\nWhat is the pass key? The pass key is"),  # with the pass-key instruction first
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("adapter")
    ap.add_argument("cases", nargs="?", default=",".join(CASES))
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = CepeForCausalLM.from_pretrained(args.adapter, decoder="smollm2-135m").eval()
    tok = model.tokenizer
    cepe = build_methods(["cepe"], model, pad_id=tok.pad_token_id or 0)["cepe"]
    book = encode(tok, resources.files("cepe").joinpath("resources/moby_dick_ch1-3.txt").read_text())
    stops = stop_ids(tok)
    for name in args.cases.split(","):
        statement, question = CASES[name]
        prefix = encode(tok, INTRO) if name.endswith("+intro") else []
        contains = exact = 0
        for trial, depth in enumerate((0.1, 0.3, 0.5, 0.7, 0.9)):
            value = str(10000 + (7919 * (trial + 3) * 13) % 89999)
            needle, q = encode(tok, " " + statement.format(v=value) + " "), encode(tok, question)
            room = args.length - len(needle) - len(q)
            at = sentence_end_before(tok, book[:room], int(depth * room))
            body = book[:at] + needle + book[at:room] + q
            answer = tok.decode(cepe.generate(window_request(prefix, body, 256), 8, stops), skip_special_tokens=True)
            contains += value in answer
            exact += first_integer(answer) == value
            print(f"{name:<14} depth {depth:.1f}  {value}  {answer!r}", flush=True)
        print(f"== {name}: contains {contains}/5, exact {exact}/5", flush=True)


if __name__ == "__main__":
    main()
