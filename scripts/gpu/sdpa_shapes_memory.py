"""Does GPU memory outside PyTorch's allocator grow with the number of distinct attention shapes?

Greedy generation over batches of different lengths calls SDPA with a new (query, key) length at
every step. On an H200 a QA sweep failed with ~105 GB held outside PyTorch's allocator (34 GB in
it); cuDNN attention builds one graph per shape. This replays decode-step shapes of SmolLM2
(9 heads, head dim 64, batch 64, a padding mask) per SDPA backend and prints the memory held.
    python3 scripts/gpu/sdpa_shapes_memory.py [--shapes 600] [--out $OUT/sdpa_shapes_memory.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def one(backend: str, shapes: int) -> list[dict]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = {"default": None, "cudnn": [SDPBackend.CUDNN_ATTENTION], "efficient": [SDPBackend.EFFICIENT_ATTENTION]}[
        backend
    ]
    total = torch.cuda.mem_get_info()[1]
    rows = []
    q = torch.randn(64, 9, 1, 64, device="cuda", dtype=torch.bfloat16)
    for i in range(shapes):
        n = 200 + i
        k = torch.randn(64, 9, n, 64, device="cuda", dtype=torch.bfloat16)
        mask = torch.ones(64, 1, 1, n, device="cuda", dtype=torch.bool)
        mask[::2, ..., :7] = False  # left padding on half the rows
        if order:
            with sdpa_kernel(order):
                F.scaled_dot_product_attention(q, k, k, attn_mask=mask)
        else:
            F.scaled_dot_product_attention(q, k, k, attn_mask=mask)
        if (i + 1) % (shapes // 6) == 0:
            torch.cuda.synchronize()
            used = total - torch.cuda.mem_get_info()[0]
            rows.append(
                {"backend": backend, "shapes": i + 1,
                 "outside_allocator_gib": (used - torch.cuda.memory_reserved()) / 2**30,
                 "reserved_gib": torch.cuda.memory_reserved() / 2**30}
            )
    return rows


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", type=int, default=600)
    p.add_argument("--out", default="sdpa_shapes_memory.json")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.shapes)))
        return 0
    rows = []
    for backend in ("default", "cudnn", "efficient"):
        r = subprocess.run([sys.executable, __file__, "--shapes", str(a.shapes), "--one", backend], capture_output=True,
                           text=True, check=False)
        got = (
            json.loads(r.stdout.strip().splitlines()[-1])
            if r.returncode == 0
            else [{"backend": backend, "error": r.stderr[-400:]}]
        )
        rows += got
        for row in got:
            print(row, flush=True)
    with open(a.out, "w") as f:
        json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
