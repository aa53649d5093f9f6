"""What one training step keeps for its backward pass, with and without checkpointing the encoder's
layers (`train.encoder_checkpointing`), as the context grows: the bytes of every distinct tensor
autograd saves during the forward (parameters included), CPU fp32.

    python3 scripts/bench_saved_activations.py [--adapter weights/cepe-smollm2-135m] [--contexts 4K,16K]

The growth per context token is what decides whether a long-context batch fits (docs/training.md).
"""

from __future__ import annotations

import argparse

import torch

from cepe import CepeForCausalLM
from cepe.evaluation.cli_args import ints


def saved_mib(model: CepeForCausalLM, context_tokens: int, window: int, chunk: int) -> float:
    """Bytes (MiB) of the distinct tensors saved for backward by one forward of a (1, window) batch
    over `context_tokens` tokens of random context in (1, n, chunk) chunks."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 5000, (1, window), generator=g)
    ctx = torch.randint(100, 5000, (1, context_tokens // chunk, chunk), generator=g)
    seen: set[tuple] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, context_input_ids=ctx, labels=ids).loss
    loss.backward()
    return total / 2**20


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", default="weights/cepe-smollm2-135m")
    ap.add_argument("--decoder", default="smollm2-135m")
    ap.add_argument("--contexts", default="4K,16K", help="context lengths, e.g. 4K,16K")
    ap.add_argument("--window", type=int, default=64, help="decoder tokens")
    a = ap.parse_args(argv)
    lengths = ints(a.contexts)
    rows = []
    for ckpt in (False, True):
        model = CepeForCausalLM.from_pretrained(a.adapter, decoder=a.decoder).train()
        if ckpt:
            model.gradient_checkpointing_enable(decoder=False, encoder=True)
        chunk = model.config.chunk_size
        rows.append([saved_mib(model, n, a.window, chunk) for n in lengths])
    print(f"{'encoder checkpointing':<22}" + "".join(f"{n:>10,}" for n in lengths) + "   per context token")
    for name, r in zip(("off", "on"), rows):
        per = (r[-1] - r[0]) * 2**20 / max(lengths[-1] - lengths[0], 1) if len(r) > 1 else float("nan")
        print(f"{name:<22}" + "".join(f"{v:>8.0f} M" for v in r) + f"   {per / 1024:,.1f} KiB")


if __name__ == "__main__":
    main()
