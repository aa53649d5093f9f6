"""Where does cross-attention look when an adapter answers RULER's multi-key needles?

For each sample: the share of the answer position's cross-attention (the last decoder token before
the answer, averaged over heads) that falls on each needle's value tokens and key tokens, per
cross-attention layer. A model that finds the needles but not the asked one spreads its mass over
all four values; one that binds puts it on the asked value. Full attention, no length scaling (16K
is under the release's 32K). Results: docs/results_general_stage19.md.

    python3 scripts/needle_attention.py --adapter released --samples 0 1 4 6 \\
        --answers docs/results/h200/general_s18/release_topk16/ruler_smollm2.json --out diag.json
"""

import argparse
import json
import re

import torch

from cepe.data.pipeline import tokenizer_bos
from cepe.evaluation.tasks.common import window_request
from cepe.evaluation.tasks.ruler import PromptBuilder
from cepe.model.loading import load_model

TASK, LENGTH = "niah_multikey", 16384


def spans(flat: list[int], ids: list[int]) -> list[int]:
    """Positions in `flat` covered by every occurrence of the token run `ids`."""
    n = len(ids)
    return [j for i in range(len(flat) - n + 1) if flat[i : i + n] == ids for j in range(i, i + n)]


def answer_attention(model, captured: dict, mask: torch.Tensor | None) -> dict[int, torch.Tensor]:
    """Layer -> (S,) attention of the captured last decoder position over the S context tokens."""
    out = {}
    for layer, (mod, h, key) in captured.items():
        kv_heads = key.shape[1]
        group = mod.num_heads // kv_heads
        q = mod.q_proj(mod.norm(h)).view(1, kv_heads, group, mod.head_dim)  # (1, Hkv, G, d): one position
        scores = torch.einsum("bhgd,bhsd->bhgs", q, key) * mod.scaling
        if mask is not None:
            scores = scores.masked_fill(~mask.reshape(1, 1, 1, -1).bool(), float("-inf"))
        out[layer] = scores.softmax(-1).mean(dim=(1, 2))[0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", default="released")
    ap.add_argument("--samples", type=int, nargs="+", required=True, help="RULER sample indices")
    ap.add_argument("--answers", help="a `cepe eval ruler` result: its predictions and scores are shown beside")
    ap.add_argument("--decoder-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(adapter=args.adapter, dtype=torch.float32, device="cpu").eval()
    tok = model.tokenizer
    bos = tokenizer_bos(tok)
    head = [] if bos is None else [bos]  # as the evaluation lays it out (Gemma reads <bos> first)
    answered = {}
    builder = PromptBuilder(tok)
    if args.answers:
        ref = json.load(open(args.answers))["results"]
        answered = {s["index"]: s for s in ref["samples"] if s["task"] == TASK}
        builder.reuse_sizes(ref)  # the same haystacks
    captured: dict = {}
    for name, mod in model.cross_attn.items():
        def keep(m, a, kw, layer=int(name)):
            captured[layer] = (m, a[0][:, -1:].detach(), a[1].detach())
        mod.register_forward_pre_hook(keep, with_kwargs=True)
    rows = []
    for i in args.samples:
        prompt = builder.prompt(TASK, LENGTH, i)
        request = window_request(prompt.prefix, prompt.body, args.decoder_tokens)
        text = tok.decode(list(request.context[0]))
        needles = dict(re.findall(r"special magic numbers? for ([\w-]+) is: (\d+)", text))
        ids, mask = model.tokenize_context([text])
        flat = ids.reshape(-1).tolist()
        captured.clear()
        with torch.no_grad():
            ctx = model.encode(ids, mask)
            model(input_ids=torch.tensor([head + list(request.prefix) + list(request.tokens)]), context=ctx,
                  use_cache=False)
            attention = answer_attention(model, dict(sorted(captured.items())), ctx.attention_mask)
        enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        values = {k: spans(flat, enc(v)) or spans(flat, enc(" " + v)) for k, v in needles.items()}
        keys = {k: spans(flat, enc(" " + k)) for k in needles}
        asked = next(k for k, v in needles.items() if v in prompt.sample.answers)
        layers = {layer: {"values": {k: round(float(p[v].sum()), 4) for k, v in values.items()},
                          "keys": {k: round(float(p[v].sum()), 4) for k, v in keys.items()}}
                  for layer, p in attention.items()}
        seen = answered.get(i, {})
        rows.append({"index": i, "asked": asked, "needles": needles, "prediction": seen.get("prediction", "")[:20],
                     "score": seen.get("score"), "layers": layers})
        top = sorted(layers, key=lambda layer: -sum(layers[layer]["values"].values()))[:3]
        shares = [layers[layer]["values"][asked] / max(sum(layers[layer]["values"].values()), 1e-9) for layer in top]
        print(f"sample {i}: asked {asked}, score {seen.get('score')}; layers {top} hold "
              f"{[round(sum(layers[layer]['values'].values()), 2) for layer in top]} on the needles' values, "
              f"the asked one's share {[round(s, 2) for s in shares]}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
