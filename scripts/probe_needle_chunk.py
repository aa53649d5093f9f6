"""Is it the needle's encoder states or the match? The pass-key needle in the built-in filler, with its
own 256-token chunk either filler too (`filler`) or running text from Moby-Dick (`isolated`), in chunk
1, 4, 8 or 12 of 16; the decoder window holds 200 filler tokens and the question. CPU, a minute:

    python3 scripts/probe_needle_chunk.py ADAPTER filler|isolated
"""
import sys
import torch
from importlib import resources
from cepe import CepeForCausalLM
from cepe.evaluation.methods import build_methods
from cepe.evaluation.metrics import first_integer
from cepe.evaluation.tasks.common import encode, stop_ids, window_request
from cepe.evaluation.tasks.passkey import FILLER, NEEDLE, QUESTION
torch.set_num_threads(2)
model = CepeForCausalLM.from_pretrained(sys.argv[1], decoder="smollm2-135m").eval()
tok = model.tokenizer
m = build_methods(["cepe"], model, pad_id=tok.pad_token_id or 0)["cepe"]
unit, q = encode(tok, FILLER), encode(tok, QUESTION)
book = encode(tok, resources.files("cepe").joinpath("resources/moby_dick_ch1-3.txt").read_text())
mode = sys.argv[2]  # "isolated": needle chunk is book text; "filler": needle chunk is filler too
hits = 0
for t, chunk_index in enumerate((1, 4, 8, 12)):
    v = str(10000 + (7919 * (t + 3) * 13) % 89999)
    needle = encode(tok, " " + NEEDLE.format(key=v))
    hay = (unit * 400)[: 16 * 256]
    src = book[1000:1000 + 256 - len(needle)] if mode == "isolated" else hay[:256 - len(needle)]
    block = src[:100] + needle + src[100:]
    ctx = hay[: chunk_index * 256] + block + hay[(chunk_index + 1) * 256 :]
    body = ctx + hay[:200] + q
    ans = tok.decode(m.generate(window_request([], body, 200 + len(q)), 8, stop_ids(tok)), skip_special_tokens=True)
    hits += first_integer(ans) == v
    print(mode, chunk_index, v, repr(ans), flush=True)
print(mode, hits, "/ 4")
