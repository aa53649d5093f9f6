"""What decoding from fp8 encoder states costs a real adapter (issue 16): teacher-forced decoding
steps of the released adapter, scored against the `cache` policy.

For each window of held-out text: the preceding `--context` tokens are encoded, the decoder reads
`--prefix` tokens, then `--scored` tokens are fed one decoding step at a time (teacher-forced)
and the log-likelihood of each is taken from that step's logits. Three ways of reading the context
in those steps (the prefill always projects keys/values once):
- cache: the cross-attention keys/values projected once and kept (the reference);
- absorbed: `kv_policy="absorbed"`, two matmuls over the encoder states (`absorbed.attend_matmul`);
- absorbed-fp8: the same with the states in fp8 read by fp8 matmuls (`absorbed_fp8.attend_fp8`).
Reported: mean NLL per scored token and perplexity per way, the relative change against cache,
and the mean relative logit error per step. Runs on the CPU (`torch._scaled_mm` has a CPU kernel).

    PYTHONPATH=src python3 scripts/fp8_decode_cost.py --data DIR_OR_JSONL ... --out results.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cepe.model import absorbed as absorbed_module
from cepe.model import decoding
from cepe.model.absorbed_fp8 import attend_fp8, pack_fp8
from cepe.model.configuration import apply_runtime_settings
from cepe.model.context import ContextStates

WAYS = ("cache", "absorbed", "absorbed-fp8")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, help=".jsonl files ({'text': ...}) or .txt files")
    p.add_argument("--adapter", default="released")
    p.add_argument("--context", type=int, default=2048, help="context tokens encoded before the window")
    p.add_argument("--prefix", type=int, default=64, help="decoder tokens read before the scored ones")
    p.add_argument("--scored", type=int, default=32, help="tokens scored, one decoding step each")
    p.add_argument("--windows", type=int, default=2, help="windows per document")
    p.add_argument("--max-docs", type=int, default=1, help="documents long enough per file (the first ones)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def documents(paths: list[str]) -> list[list[str]]:
    """Each file's documents, in order."""
    out = []
    for path in map(Path, paths):
        if path.suffix == ".jsonl":
            out.append([json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()])
        else:
            out.append([path.read_text()])
    return out


class Fp8Attend:
    """Stands in for `absorbed.attend` inside a `with`: the states packed to fp8 once per tensor."""

    def __init__(self):
        self.packed: dict[int, tuple[torch.Tensor, object]] = {}

    def __call__(self, q, states, key_mask=None, kernel="auto", chunk=16384, state_scale=None):
        held = self.packed.get(id(states))
        if held is None or held[0] is not states:
            held = (states, pack_fp8(states.float()))
            self.packed[id(states)] = held
        return attend_fp8(q, held[1], key_mask)

    def __enter__(self):
        self.original, absorbed_module.attend = absorbed_module.attend, self
        return self

    def __exit__(self, *exc):
        absorbed_module.attend = self.original


@torch.no_grad()
def step_logits(model, encoded: ContextStates, prefix: list[int], targets: list[int], way: str) -> torch.Tensor:
    """(len(targets), V) float32 log-probabilities, each from the step that reads the token before it.
    Each way gets a fresh `ContextStates` over the same states: keys/values another way cached stay
    out of it."""
    apply_runtime_settings(model.config, {"kv_policy": "cache" if way == "cache" else "absorbed"})
    ctx = ContextStates(encoded.hidden_states, encoded.attention_mask, encoded.encoder_hash)
    batch = decoding.Batch(model, pad_id=0, context=ctx)
    rows = [batch.prefill([prefix])]
    for t in targets[:-1]:
        rows.append(batch.step(torch.tensor([t])))
    return torch.cat(rows).float().log_softmax(-1)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from cepe.model.loading import load_model

    model = load_model(adapter=args.adapter, dtype="float32", device="cpu").eval()
    tok = model.tokenizer
    need = args.context + args.prefix + args.scored
    windows = []
    for texts in documents(args.data):
        taken = 0
        for text in texts:
            ids = tok(text, add_special_tokens=False).input_ids
            if len(ids) < need or taken == args.max_docs:
                continue
            taken += 1
            for k in range(args.windows):
                start = (len(ids) - need) * k // max(1, args.windows - 1) if args.windows > 1 else 0
                windows.append(ids[start:start + need])
    if not windows:
        sys.exit(f"no document has {need} tokens")
    nll = {w: 0.0 for w in WAYS}
    logit_err = {w: [] for w in WAYS[1:]}
    n = 0
    t0 = time.perf_counter()
    for ids in tqdm(windows, desc="windows", file=sys.stderr):
        context, prefix = ids[:args.context], ids[args.context:args.context + args.prefix]
        targets = ids[args.context + args.prefix:]
        with torch.no_grad():  # encoded once, read three ways
            encoded = model.encode_context([context] if model.config.encoder_type == "decoder"
                                           else [tok.decode(context)])
        logp = {}
        for way in WAYS:
            with Fp8Attend() if way == "absorbed-fp8" else contextlib.nullcontext():
                logp[way] = step_logits(model, encoded, prefix, targets, way)
        idx = torch.tensor(targets)[:, None]
        for way in WAYS:
            nll[way] += -logp[way].gather(1, idx).sum().item()
        for way in WAYS[1:]:  # decoding steps only (the first row is the shared prefill)
            diff = (logp[way][1:] - logp["cache"][1:]).norm(dim=-1) / logp["cache"][1:].norm(dim=-1)
            logit_err[way] += diff.tolist()
        n += len(targets)
    result = {"adapter": args.adapter, "windows": len(windows), "scored_tokens": n, "args": vars(args),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "seconds": round(time.perf_counter() - t0, 1), "ways": {}}
    print(f"\n{len(windows)} windows, {n} scored tokens, context {args.context}, prefix {args.prefix}")
    print(f"{'way':>14} {'NLL':>8} {'ppl':>8} {'vs cache':>9} {'logit err':>10}")
    for way in WAYS:
        mean = nll[way] / n
        errs = logit_err.get(way)
        row = {"nll": mean, "ppl": math.exp(mean), "vs_cache": math.exp(mean) / math.exp(nll["cache"] / n) - 1,
               "mean_rel_logit_err": sum(errs) / len(errs) if errs else 0.0}
        result["ways"][way] = row
        print(f"{way:>14} {mean:>8.4f} {row['ppl']:>8.3f} {100 * row['vs_cache']:>8.2f}% "
              f"{row['mean_rel_logit_err']:>10.2e}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
