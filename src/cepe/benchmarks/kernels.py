"""The cross-attention core alone, under each SDPA kernel (`cepe bench --tasks kernels`): the
prefill shape (D queries per key/value head group) and one decoding step (one query per head)
over `context` tokens of random keys and values, laid out as the library makes them."""

from __future__ import annotations

import contextlib

import torch

from . import flops as F
from .timing import GB, Timer, free_memory, is_cuda, median

# row name -> torch.nn.attention.SDPBackend member (None: PyTorch's own choice)
_BACKENDS = {"default": None, "flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION",
             "efficient": "EFFICIENT_ATTENTION"}
BACKENDS = tuple(_BACKENDS)


def kernel_rows(x: F.CrossShape, context: int, queries: int, total: int, device, dtype) -> list[dict]:
    """One row per phase and backend: time_ms, TFLOP/s and GB/s of
    `scaled_dot_product_attention` with q (1, Hkv, group x n, d) over k, v (1, Hkv, context, d);
    a backend that refuses the shape gives a row with status "error"."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device=device).manual_seed(0)
    group = x.heads // x.kv_heads

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=g)

    # contiguous (1, Hkv, S, d), as `CrossAttention.project_kv` lays out its keys/values since 26fe02d
    k = rand(1, x.kv_heads, context, x.head_dim)
    v = rand(1, x.kv_heads, context, x.head_dim)
    rows = []
    for phase, n in (("prefill", queries), ("decode", 1)):
        q = rand(1, x.kv_heads, group * n, x.head_dim)
        flop = 4 * x.heads * x.head_dim * n * context
        nbytes = (2 * k.numel() + 2 * q.numel()) * k.element_size()
        for name, member in _BACKENDS.items():
            row = dict(task="kernel", phase=phase, backend=name, total_len=total, context_tokens=context, queries=n,
                       kv_heads=x.kv_heads, heads=x.heads, status="ok", error=None)
            try:
                with sdpa_kernel([getattr(SDPBackend, member)]) if member else contextlib.nullcontext():
                    fn = lambda q=q: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
                    t = median(event_times(fn, reps=10 if phase == "prefill" else 50, device=device))
                row.update(time_ms=t * 1e3, tflops_per_s=flop / t / 1e12, gb_per_s=nbytes / t / GB)
            except RuntimeError as e:
                row.update(status="error", error=str(e).splitlines()[0][:200])
            rows.append(row)
    k = v = None  # drop the tensors (the lambdas above read these names) before freeing the cache
    free_memory(device)
    return rows


def event_times(fn, reps: int, device) -> list[float]:
    """Seconds per call after one warm-up: on CUDA from events around each call (the kernel's own
    time); elsewhere the wall clock, as `Timer` reads it."""
    if not is_cuda(device):
        return Timer(device)(fn, reps=reps, warmup=1)[0]
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times
