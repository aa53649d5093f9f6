"""Timers, peak memory, out-of-memory as a result, device ceilings and the environment of a run."""

from __future__ import annotations

import gc
import platform
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

import torch

GB = 1e9  # decimal gigabytes, as the reports and the issue targets state them


def is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def sync(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


def free_memory(device) -> None:
    """Return what a finished (or failed) measurement held to the device allocator."""
    if is_cuda(device):
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


class Timer:
    """Wall time of device work: synchronises before reading the host clock (CUDA events would
    miss host-side gaps, which are part of what a user waits for)."""

    def __init__(self, device):
        self.device = device

    def __call__(self, fn: Callable[[], object], reps: int = 3, warmup: int = 1) -> tuple[list[float], object]:
        """Seconds of each of `reps` calls after `warmup` untimed ones, and the last output."""
        out = None
        for _ in range(warmup):
            out = fn()
            sync(self.device)
        times = []
        for _ in range(reps):
            out = None  # free the previous output before the next call
            sync(self.device)
            t0 = time.perf_counter()
            out = fn()
            sync(self.device)
            times.append(time.perf_counter() - t0)
        return times, out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


@dataclass
class Timing:
    """Timed calls after a warm-up that ran until repeated timings agreed.

    times: the seconds reported (the last calls, which agree within the tolerance when
    `converged`); warmup: every earlier call, the first call of the process first."""

    times: list[float]
    warmup: list[float] = field(default_factory=list)
    converged: bool = True
    tolerance: float = 0.05

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def row(self) -> dict:
        """The spread fields every timed row carries: min / median / max, coefficient of variation,
        (max - min) / median, and how the first call compared with the repeats."""
        med = self.median
        first = self.warmup[0] if self.warmup else self.times[0]
        cv = statistics.pstdev(self.times) / med if len(self.times) > 1 and med > 0 else 0.0
        return {"time_s": med, "times_s": self.times, "time_min_s": min(self.times), "time_max_s": max(self.times),
                "time_cv": cv, "time_spread": (max(self.times) - min(self.times)) / med if med > 0 else 0.0,
                "first_call_s": first, "first_over_median": first / med if med > 0 else None,
                "warmup_s": self.warmup, "warm_converged": self.converged}


def time_until_stable(fn: Callable[[], object], device, reps: int = 3, tolerance: float = 0.05,
                      max_calls: int = 10, long_s: float = 3.0, long_reps: int = 2, long_max_calls: int = 3,
                      untimed_first: bool = False) -> Timing:
    """Call `fn` until the last `reps` calls agree within `tolerance` ((max - min) / min), then
    report those calls; the ones before are the warm-up (the first call always is: caches, kernel
    choice, allocator). A fresh process's first call can be 2.6x slower than its repeats (issue 16),
    so a fixed single warm-up call is not enough.

    Bounded: at most `max_calls` calls, or `long_max_calls` when a call takes over `long_s` seconds
    (those need only `long_reps` agreeing calls: full attention over 256K tokens takes ~50 s a call).
    If the bound is hit, the last calls are reported with `converged` False. `untimed_first`: the
    first call is not even timed (compilation)."""
    timer = Timer(device)
    if untimed_first:
        timer(fn, reps=0, warmup=1)
    seen: list[float] = []
    need, limit = max(2, reps), max_calls  # agreement needs at least two calls
    while True:
        (t,), out = timer(fn, reps=1, warmup=0)
        del out
        seen.append(t)
        if t > long_s:
            need, limit = min(need, long_reps), min(max_calls, long_max_calls)
        window = seen[1:][-need:]  # never the first call
        if len(window) == need and max(window) <= min(window) * (1 + tolerance):
            return Timing(window, seen[: len(seen) - need], True, tolerance)
        if len(seen) >= max(limit, need + 1):
            return Timing(window, seen[: len(seen) - len(window)], False, tolerance)


class PeakMemory:
    """Peak device memory of a region, as the bytes a method needs: its own weights plus the
    peak of everything allocated inside the region. Weights that are resident but unused by the
    method (the encoder and cross-attention while the full-attention baseline runs) do not count."""

    def __init__(self, device, method_weight_bytes: int):
        self.device, self.weights = device, method_weight_bytes
        self.peak_bytes: int | None = None
        self.raw_peak_bytes: int | None = None

    def __enter__(self):
        if is_cuda(self.device):
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        if is_cuda(self.device):
            torch.cuda.synchronize(self.device)
            raw = torch.cuda.max_memory_allocated(self.device)
            self.raw_peak_bytes = raw
            self.peak_bytes = raw - self.base + self.weights
        return False


def oom_types() -> tuple[type, ...]:
    return (torch.OutOfMemoryError,)


@contextmanager
def sdpa_backend(name: str):
    """Run under one SDPA kernel preference: 'default' (PyTorch's own choice), 'flash', 'cudnn',
    'efficient', 'math'. The named kernel is tried first; others remain as fallbacks for inputs it
    cannot take (for example a float mask, which flash attention does not accept)."""
    if name == "default":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    if name not in names:
        raise ValueError(f"--sdpa must be one of default, {', '.join(names)}; got {name!r}")
    order = [names[name]] + [b for k, b in names.items() if k != name]
    try:
        ctx = sdpa_kernel(order, set_priority=True)
    except TypeError:  # older torch: no priority order, only the allowed set
        ctx = sdpa_kernel(order)
    with ctx:
        yield


def device_ceilings(device, dtype: torch.dtype = torch.bfloat16, size: int = 8192, reps: int = 10) -> dict:
    """Measured, not datasheet: a large matmul on random data (FLOP/s) and a device-to-device copy
    (bytes read + written per second)."""
    if not is_cuda(device):
        return {"matmul_tflops": None, "copy_gbps": None}
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    for _ in range(3):
        torch.mm(a, b)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        torch.mm(a, b)
    end.record()
    torch.cuda.synchronize(device)
    mm_s = start.elapsed_time(end) / 1e3 / reps
    del a, b
    n = 2**30 // 2  # 1 GiB of bf16
    src = torch.empty(n, device=device, dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start.record()
    for _ in range(reps):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize(device)
    cp_s = start.elapsed_time(end) / 1e3 / reps
    del src, dst
    free_memory(device)
    return {"matmul_tflops": 2 * size**3 / mm_s / 1e12, "copy_gbps": 2 * 2**30 / cp_s / GB,
            "matmul_shape": [size, size, size]}


def environment(device, dtype: torch.dtype, sdpa: str, command: str) -> dict:
    """What every row records: device, versions, dtype, attention backend, exact command."""
    import transformers

    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        total = torch.cuda.get_device_properties(dev).total_memory
    else:
        name, total = platform.processor() or platform.machine() or "cpu", None
    return {
        "device": name,
        "device_memory_gb": None if total is None else round(total / GB, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "dtype": str(dtype).replace("torch.", ""),
        "attention": f"sdpa:{sdpa}",
        "command": command,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
