"""One decoding step's cross-attention with top-k (`cross_attn_topk`) over a long context, every
layer of an adapter: read from the encoder states (the absorbed policy) against projecting each
layer's keys/values per call, the path the absorbed policy took with top-k before 54c8c69.

    python3 scripts/bench_absorbed_topk.py --adapter released --context 64K --topk 16
"""
from __future__ import annotations

import argparse
import copy

import torch

from cepe.benchmarks.kernels import event_times
from cepe.evaluation.cli_args import size
from cepe.model.absorbed import absorb, absorbed_cross_attention
from cepe.model.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", default="released")
    ap.add_argument("--context", type=size, default=65536, help="context tokens (random states)")
    ap.add_argument("--topk", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    model = load_model(adapter=args.adapter, dtype=args.dtype, device=args.device)
    blocks = list(model.cross_attn.values())
    dtype, dev = blocks[0].q_proj.weight.dtype, blocks[0].q_proj.weight.device
    states = torch.randn(1, args.context, blocks[0].k_proj.in_features, dtype=dtype, device=dev)
    h = torch.randn(1, 1, blocks[0].q_proj.in_features, dtype=dtype, device=dev)
    weights = [absorb(b) for b in blocks]

    def absorbed() -> list[torch.Tensor]:
        return [absorbed_cross_attention(b, h, states, weights=w, topk=args.topk) for b, w in zip(blocks, weights)]

    def projected() -> list[torch.Tensor]:
        return [b(h, *b.project_kv(states), topk=args.topk) for b in blocks]

    with torch.no_grad():
        t_abs, t_proj = (min(event_times(fn, args.repeats, dev)) for fn in (absorbed, projected))
        a, p = absorbed(), projected()
    # the two paths round differently in bf16 (the absorbed one scores q W_k^T against the states,
    # the projected one the projected keys), so each is compared with the projected path in fp32
    ref = [copy.deepcopy(b).float() for b in blocks]
    with torch.no_grad():
        r = [b(h.float(), *b.project_kv(states.float()), topk=args.topk) for b in ref]
    err = [max(float((x.float() - y).abs().max()) for x, y in zip(out, r)) for out in (a, p)]
    print("| layers | context | k | absorbed top-k | projected per call | speed-up | max err vs fp32 (abs., proj.) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {len(blocks)} | {args.context} | {args.topk} | {t_abs * 1e3:.1f} ms | {t_proj * 1e3:.1f} ms "
          f"| {t_proj / t_abs:.1f}x | {err[0]:.1e}, {err[1]:.1e} |")


if __name__ == "__main__":
    main()
