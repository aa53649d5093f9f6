"""What a training recipe's batches hold: context lengths per sample kind, and what a micro-batch
costs once its contexts are padded to the longest (cross-attention reads every padded key).

    python3 scripts/context_lengths.py --config configs/general_smollm2.yaml data.train=[MIX/train,MIX/heldout] \
        data.facts.context_tokens=[256,65536] data.context_draw=block --samples 1024 --out lengths.json

Samples are built exactly as training builds them (indices 0..N-1 of the train stream), on the CPU,
without a model forward.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cepe.data.pipeline import build_data
from cepe.training.build import build_model
from cepe.training.config import load_config


def summarize(kinds: list[str], ctx: np.ndarray, windows: np.ndarray, batch: int, chunk: int) -> dict:
    """Per kind: count and context-length quantiles; per micro-batch of `batch` consecutive
    samples: real and padded encoder tokens, and decoder x padded-key products (cross-attention's
    score entries per head)."""
    out: dict = {"kinds": {}, "batches": {}}
    for kind in sorted(set(kinds)):
        c = ctx[np.array(kinds) == kind]
        out["kinds"][kind] = {"samples": int(len(c)), "p10": int(np.percentile(c, 10)), "p50": int(np.median(c)),
                              "p90": int(np.percentile(c, 90)), "max": int(c.max()),
                              "at_least_16K": float((c >= 16384).mean()), "at_least_32K": float((c >= 32768).mean())}
    n = len(ctx) // batch * batch
    padded_len = np.ceil(ctx[:n].reshape(-1, batch).max(1) / chunk) * chunk  # chunks of `chunk` tokens
    real = ctx[:n].reshape(-1, batch).sum(1)
    scores = windows[:n].reshape(-1, batch).max(1) * batch * padded_len
    out["batches"] = {"batches": int(n // batch), "real_tokens_mean": float(real.mean()),
                      "padded_tokens_mean": float((padded_len * batch).mean()),
                      "padded_tokens_max": float((padded_len * batch).max()),
                      "padding_share": float(1 - real.sum() / (padded_len * batch).sum()),
                      "score_entries_mean": float(scores.mean()), "score_entries_max": float(scores.max())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*", help="key=value, as for `cepe train`")
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--out", help="JSON file for the summary")
    args = ap.parse_args()
    cfg = load_config(args.config, [*args.overrides, "model.init_adapter=null"])
    model = build_model(cfg)
    data = build_data(cfg.data, model.tokenizer, model.encoder_tokenizer, progress=True)
    kinds, ctx, windows = [], [], []
    for i in tqdm(range(args.samples), desc="samples"):
        s = data.train[i]
        kinds.append(s["kind"])
        ctx.append(sum(len(c) for c in s["context"]))
        windows.append(len(s["input_ids"]))
    summary = summarize(kinds, np.array(ctx), np.array(windows), cfg.train.batch_size, cfg.model.chunk_size)
    print("| kind | samples | p10 | median | p90 | max | >= 16K | >= 32K |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, k in summary["kinds"].items():
        print(f"| {kind} | {k['samples']} | {k['p10']:,} | {k['p50']:,} | {k['p90']:,} | {k['max']:,} "
              f"| {k['at_least_16K']:.0%} | {k['at_least_32K']:.0%} |")
    b = summary["batches"]
    print(f"\n{b['batches']} micro-batches of {cfg.train.batch_size}: "
          f"{b['real_tokens_mean']:,.0f} real context tokens, {b['padded_tokens_mean']:,.0f} padded "
          f"(max {b['padded_tokens_max']:,.0f}; {b['padding_share']:.0%} padding); window x padded keys "
          f"per head {b['score_entries_mean'] / 1e6:,.0f}M (max {b['score_entries_max'] / 1e6:,.0f}M)")
    if args.out:
        Path(args.out).write_text(json.dumps({"overrides": args.overrides, **summary}, indent=1))


if __name__ == "__main__":
    main()
