"""Decoding from encoder states with absorbed projections, against the cross-attention key/value
cache, on LLaMA-2-7B cross-attention shapes (issue 16): correctness, then time per decoding step
(one layer and all 32) and peak memory at 128K-1M context tokens.

Shapes: 32 layers of `CrossAttention(4096 -> 32 query heads x 128, encoder 1024 -> 8 kv heads)`,
bf16, random weights and states (speed does not depend on their values), batch 1, one new token.
Methods for the cross-attention of one step:
- cache: the library's `CrossAttention.forward` over per-layer keys/values projected beforehand
  (the `cache` policy; 128 KiB per context token over 32 layers);
- matmul: `absorbed_cross_attention(kernel="matmul")`, two plain matmuls over the shared states;
- triton: the same with the flash-decoding kernel (`cepe.kernels.absorbed_decode`);
- fp8mm: the states in fp8 (two layouts) and two fp8 tensor-core matmuls (`cepe.model.absorbed_fp8`);
- fp8mm-fused: the same with the work between the matmuls compiled (`attend_fp8(fused=True)`).
Every step is captured as a CUDA graph and replayed (no launch gaps, as `cepe bench` decodes).

    PYTHONPATH=src python3 scripts/gpu/bench_absorbed.py --out $OUT      # H200, ~3-4 minutes
    PYTHONPATH=src python3 scripts/gpu/bench_absorbed.py --tiny --out /tmp/absorbed   # CPU dry run
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cepe.model.absorbed import absorb, absorbed_cross_attention, attend
from cepe.model.absorbed_fp8 import Fp8States, attend_fp8, pack_fp8
from cepe.model.cross_attention import CrossAttention
from cepe.model.stored_states import quantize_states

FULL = dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, encoder_hidden=1024, layers=32,
            contexts=[128 * 1024, 256 * 1024, 512 * 1024, 1024 * 1024], check_context=128 * 1024)
TINY = dict(hidden=64, heads=4, kv_heads=2, head_dim=16, encoder_hidden=32, layers=2,
            contexts=[256, 1000], check_context=777)
CONFIGS = [dict(block_r=32, block_s=64, num_warps=8, num_stages=2), dict(block_r=32, block_s=32, num_warps=8),
           dict(block_r=16, block_s=64, num_warps=8), dict(block_r=32, block_s=64, num_warps=8, transposed=True)]
GB = 1e9
METHODS = ("cache", "matmul", "fp8mm", "fp8mm-fused", "triton", "triton-int8", "triton-fp8")  # the module doc's list


def build(shape: dict, device, dtype) -> list[CrossAttention]:
    torch.manual_seed(0)
    blocks = []
    for _ in range(shape["layers"]):
        with torch.device(device):  # initialise on the device: 1.1 B weights take ~20 s on the host
            blk = CrossAttention(shape["hidden"], shape["encoder_hidden"], shape["heads"], shape["kv_heads"],
                                 shape["head_dim"], torch.nn.RMSNorm(shape["hidden"], eps=1e-5))
        blocks.append(blk.to(dtype).eval())
    return blocks


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_step(fn, device, reps: int) -> dict:
    """Milliseconds per call: a CUDA graph of one call, replayed `reps` times per sample, 5 samples
    after warm-up (CPU: eager calls). Spread = (max - min) / median of the samples."""
    cuda = torch.device(device).type == "cuda"
    graph, mode = None, "eager"
    if cuda:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            mode = "graph"
        except Exception as e:  # an uncapturable step is still timed, eagerly, and says so
            print(f"  capture failed ({type(e).__name__}: {str(e)[:120]}): eager timing", file=sys.stderr)
            graph = None
    call = graph.replay if graph is not None else fn
    for _ in range(3):
        call()
    samples = []
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            call()
        sync(device)
        samples.append((time.perf_counter() - t0) / reps * 1e3)
    med = statistics.median(samples)
    del graph
    return {"ms": med, "ms_min": min(samples), "ms_max": max(samples), "spread": (max(samples) - min(samples)) / med,
            "mode": mode}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm())


@torch.no_grad()
def check(blocks, shape, device, dtype, configs, kernels) -> dict:
    """bf16 kernel and matmul paths against a float32 cache-path reference on random data with a
    padded context tail and a length-scaled row, at `check_context` tokens; and every kernel
    configuration against the two matmuls, attention alone."""
    s = shape["check_context"]
    g = torch.Generator(device=device).manual_seed(1)
    h = torch.randn(2, 1, shape["hidden"], device=device, dtype=dtype, generator=g)
    states = torch.randn(2, s, shape["encoder_hidden"], device=device, dtype=dtype, generator=g)
    mask = torch.ones(2, s, dtype=torch.bool, device=device)
    mask[1, s - s // 3:] = False
    scale = torch.tensor([1.0, 0.8], device=device)
    out = {}
    for i in (0, len(blocks) - 1):
        blk = blocks[i]
        ref = copy.deepcopy(blk).float()
        exact = ref(h.float(), *ref.project_kv(states.float()), mask, scale)
        errs = {"cache": rel_err(blk(h, *blk.project_kv(states), mask, scale), exact)}
        w = absorb(blk)
        for kernel in kernels:
            try:
                errs[kernel] = rel_err(
                    absorbed_cross_attention(blk, h, states, mask, scale, weights=w, kernel=kernel), exact
                )
            except Exception as e:
                errs[kernel] = f"{type(e).__name__}: {str(e)[:200]}"
        out[f"layer{i}_rel_err_vs_fp32"] = errs
        del ref, exact
    q = torch.randn(2, shape["heads"], shape["encoder_hidden"], device=device, dtype=dtype, generator=g) * 0.05
    base = attend(q, states, mask, kernel="matmul")
    if "triton" in kernels:  # 8-bit states: the kernel against two matmuls over the dequantized values
        from cepe.kernels.absorbed_decode import attend_states

        for fmt in ("int8", "fp8") if torch.device(device).type == "cuda" else ("int8",):
            packed = quantize_states(states, fmt)
            deq = attend(q, packed.dequantize(), mask, kernel="matmul")
            got = attend_states(q, packed.data, mask, state_scale=packed.scale)
            out[f"{fmt}_kernel_rel_err_vs_dequantized"] = rel_err(got, deq)
            out[f"{fmt}_rounding_rel_err_vs_bf16"] = rel_err(deq, base)  # what 8 bits cost, attention alone
    try:  # fp8 tensor-core matmuls (absorbed_fp8): reported, not gating `ok` (their precision is the question)
        packed8 = pack_fp8(states)
        got8 = attend_fp8(q, packed8, mask)
        out["fp8mm_rel_err_vs_dequantized"] = rel_err(got8, attend(q, quantize_states(states, "fp8").dequantize(),
                                                                   mask, kernel="matmul"))
        out["fp8mm_rel_err_vs_bf16"] = rel_err(got8, base)
        out["fp8mm_fused_rel_err_vs_bf16"] = rel_err(attend_fp8(q, packed8, mask, fused=True), base)
    except Exception as e:  # e.g. no fp8 matmul on this device
        out["fp8mm_rel_err_vs_bf16"] = f"{type(e).__name__}: {str(e)[:200]}"
    out["kernel_configs_rel_err_vs_matmul"] = {}
    for cfg in configs:
        try:
            from cepe.kernels.absorbed_decode import attend_states

            out["kernel_configs_rel_err_vs_matmul"][_name(cfg)] = rel_err(attend_states(q, states, mask, **cfg), base)
        except Exception as e:
            out["kernel_configs_rel_err_vs_matmul"][_name(cfg)] = f"{type(e).__name__}: {str(e)[:200]}"
    # absorbed bf16 must be as close to the float32 truth as the cache path's bf16, up to rounding
    errs = [out[k] for k in out if k.startswith("layer")]
    out["ok"] = all(isinstance(e[k], float) and e[k] <= 2 * e["cache"] + 1e-2 for e in errs for k in kernels)
    out["ok"] &= all(v < 2e-2 for k, v in out.items() if k.endswith("_kernel_rel_err_vs_dequantized"))
    return out


def _name(cfg: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in cfg.items())


@torch.no_grad()
def pick_config(shape, device, dtype, configs, reps) -> tuple[dict, dict]:
    """The fastest kernel configuration for one step's attention over `contexts[0]` tokens."""
    from cepe.kernels.absorbed_decode import attend_states

    s = shape["contexts"][0]
    states = torch.randn(1, s, shape["encoder_hidden"], device=device, dtype=dtype)
    q = torch.randn(1, shape["heads"], shape["encoder_hidden"], device=device, dtype=dtype) * 0.05
    times = {}
    for cfg in configs:
        try:
            times[_name(cfg)] = time_step(lambda cfg=cfg: attend_states(q, states, None, **cfg), device, reps)["ms"]
        except Exception as e:
            times[_name(cfg)] = f"{type(e).__name__}: {str(e)[:200]}"
    ok = {k: v for k, v in times.items() if isinstance(v, float)}
    best = min(ok, key=ok.get) if ok else None
    return (next(c for c in configs if _name(c) == best) if best else {}), times


class Methods:
    """The step of each method: one layer (block 0) or all layers chained through the residual."""

    def __init__(self, blocks, weights, states, kernel_cfg):
        self.blocks, self.weights, self.states, self.cfg = blocks, weights, states, kernel_cfg
        self.kv: list | None = None
        self.packed: dict = {}
        self.fp8: Fp8States | None = None

    def delta(self, method: str, i: int, h: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[i]
        if method == "cache":
            return blk(h, *self.kv[i])
        if method.startswith("fp8mm"):  # fp8 states in two layouts, fp8 tensor-core matmuls (absorbed_fp8)
            q = _queries(blk, self.weights[i], h)
            mixed = attend_fp8(q, self.fp8, None, fused=method == "fp8mm-fused")
            return _output(blk, self.weights[i], mixed, h.shape[1])
        if method.startswith("triton"):  # triton, triton-int8, triton-fp8 (8-bit states + a scale per token)
            from cepe.kernels import absorbed_decode

            q = _queries(blk, self.weights[i], h)
            packed = self.packed.get(method)
            data, scale = (self.states, None) if packed is None else (packed.data, packed.scale)
            mixed = absorbed_decode.attend_states(q, data, None, state_scale=scale, **self.cfg)
            return _output(blk, self.weights[i], mixed, h.shape[1])
        return absorbed_cross_attention(blk, h, self.states, None, None, weights=self.weights[i], kernel=method)

    def step(self, method: str, layers: int, h: torch.Tensor):
        def run():
            x = h
            for i in range(layers):
                x = x + self.delta(method, i, x)
            return x
        return run


def _queries(blk, w, h):
    from cepe.model.absorbed import absorbed_queries

    return absorbed_queries(blk, w, h)


def _output(blk, w, mixed, t):
    from cepe.model.absorbed import absorbed_output

    return absorbed_output(blk, w, mixed, t)


@torch.no_grad()
def measure(blocks, shape, device, dtype, kernel_cfg, reps, methods, deadline, save=None) -> list[dict]:
    rows = []
    weights = [absorb(b) for b in blocks]
    cuda = torch.device(device).type == "cuda"
    h = torch.randn(1, 1, shape["hidden"], device=device, dtype=dtype)
    for s in tqdm(shape["contexts"], desc="context", file=sys.stderr):
        states = torch.randn(1, s, shape["encoder_hidden"], device=device, dtype=dtype)
        m = Methods(blocks, weights, states, kernel_cfg)
        for method in methods:
            if method.startswith("triton-"):  # packed after the cache rows: they need the memory more
                m.packed = {method: quantize_states(states, method.split("-")[1])}
            m.fp8 = pack_fp8(states) if method.startswith("fp8mm") else None
            for layers in (1, shape["layers"]):
                row = dict(context=s, method=method, layers=layers, status="ok")
                if time.perf_counter() > deadline:
                    rows.append({**row, "status": "skipped", "error": "time budget spent"})
                    continue
                try:
                    if cuda:
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats(device)
                    if method == "cache":  # the cache policy's per-layer keys/values, projected beforehand
                        m.kv = [blocks[i].project_kv(states) for i in range(layers)]
                    row.update(time_step(m.step(method, layers, h), device, reps if layers == 1 else max(2, reps // 8)))
                    if cuda:
                        row["peak_gb"] = torch.cuda.max_memory_allocated(device) / GB
                except torch.OutOfMemoryError as e:
                    row.update(status="oom", error=str(e).splitlines()[0][:160])
                except Exception as e:  # a failed row is a result; the sweep goes on
                    msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                    row.update(status="oom" if "out of memory" in msg.lower() else "error", error=msg)
                m.kv = None
                he = shape["encoder_hidden"]
                per_token = {"cache": 2 * shape["kv_heads"] * shape["head_dim"] * 2, "triton-int8": he + 4,
                             "triton-fp8": he + 4, "fp8mm": 2 * he + 4}.get(method.removesuffix("-fused"), he * 2)
                row["bytes_read_floor"] = s * per_token * layers  # keys+values per layer, or the states once per layer
                row["held_context_gb"] = s * per_token * (layers if method == "cache" else 1) / GB
                if method.startswith("fp8mm"):  # two fp8 layouts, each read once a layer: 2 x He bytes
                    row["bytes_read_floor"] = s * 2 * he * layers
                if row["status"] == "ok":
                    row["gb_per_s"] = row["bytes_read_floor"] / (row["ms"] / 1e3) / GB
                rows.append(row)
                if save is not None:
                    save(rows)  # a run stopped by the command's time limit keeps what it measured
        del states, m
    return rows


@torch.no_grad()
def profile(blocks, shape, device, dtype, kernel_cfg, methods, context: int, steps: int = 10) -> dict:
    """Where one layer's step spends its device time: the top kernels of `steps` eager steps per
    method at `context` tokens (torch.profiler), so a slow path is read, not guessed."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    weights = [absorb(b) for b in blocks[:1]]
    states = torch.randn(1, context, shape["encoder_hidden"], device=device, dtype=dtype)
    h = torch.randn(1, 1, shape["hidden"], device=device, dtype=dtype)
    m = Methods(blocks, weights, states, kernel_cfg)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    out = {}
    for method in methods:
        m.fp8 = pack_fp8(states) if method.startswith("fp8mm") else None
        m.kv = [blocks[0].project_kv(states)] if method == "cache" else None
        m.packed = {method: quantize_states(states, method.split("-")[1])} if method.startswith("triton-") else {}
        run = m.step(method, 1, h)
        run()
        sync(device)
        with torch_profile(activities=acts) as prof:
            for _ in range(steps):
                run()
            sync(device)
        if len(acts) > 1:  # the kernels themselves (aten ops would count their kernels twice)
            events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
            key = "device_time_total"
        else:
            events, key = list(prof.key_averages()), "self_cpu_time_total"
        events.sort(key=lambda e: getattr(e, key), reverse=True)
        out[method] = [{"kernel": e.key[:90], "ms_per_step": getattr(e, key) / 1e3 / steps,
                        "calls_per_step": e.count / steps} for e in events[:12]]
        print(f"profile {method} @ {context} tokens, one layer:", file=sys.stderr)
        for r in out[method]:
            print(f"  {r['ms_per_step']:8.3f} ms  x{r['calls_per_step']:<5.1f} {r['kernel']}", file=sys.stderr)
    return out


def table(rows: list[dict]) -> str:
    lines = [f"{'context':>8} {'layers':>6} {'method':<11} {'ms/step':>9} {'spread':>7} {'GB/s':>7} {'peak GB':>8} "
             f"{'held GB':>8}  status"]
    for r in rows:
        k = f"{r['context'] // 1024}K" if r["context"] >= 1024 else str(r["context"])
        f = lambda key, fmt, r=r: "-" if r.get(key) is None else format(r[key], fmt)  # noqa: E731
        lines.append(f"{k:>8} {r['layers']:>6} {r['method']:<11} {f('ms', '9.3f')} {f('spread', '7.1%')} "
                     f"{f('gb_per_s', '7.0f')} {f('peak_gb', '8.1f')} {f('held_context_gb', '8.2f')}  "
                     f"{'' if r['status'] == 'ok' else r['status']}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["status"] == "ok"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    layers = max(r["layers"] for r in result["rows"])
    for method, style in (("cache", "s-"), ("matmul", "o--"), ("triton", "o-"), ("triton-int8", "^-"),
                          ("triton-fp8", "v-")):
        for ax, n in ((axes[0], 1), (axes[1], layers)):
            rs = [r for r in rows if r["method"] == method and r["layers"] == n]
            ax.plot([r["context"] for r in rs], [r["ms"] for r in rs], style, label=method)
        rs = [r for r in rows if r["method"] == method and r["layers"] == layers and r.get("peak_gb") is not None]
        axes[2].plot([r["context"] for r in rs], [r["peak_gb"] for r in rs], style, label=method)
    titles = ("cross-attention, one layer: ms/step", f"cross-attention, {layers} layers: ms/step",
              f"peak GB, {layers} layers (weights + context + step)")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"absorbed cross-attention vs key/value cache | {result['env']['device']} | {result['env']['dtype']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (dry run)")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_absorbed_out"))
    p.add_argument("--reps", type=int, default=20, help="graph replays per timing sample (one layer)")
    p.add_argument("--methods", default=None, help="comma-separated subset of cache,matmul,fp8mm,fp8mm-fused,triton,"
                   "triton-int8,triton-fp8 (default: all that run here)")
    p.add_argument("--time-budget", type=float, default=300.0, help="stop starting measurements after N s")
    p.add_argument("--profile", default=None, help="comma-separated methods to profile at the longest context "
                   "(one layer, top kernels by device time) after the timings")
    args = p.parse_args(argv)
    unknown = set((args.methods or "").split(",")) - {"", *METHODS}
    if unknown:  # a typo would otherwise spend a device call measuring nothing
        p.error(f"--methods: unknown {', '.join(sorted(unknown))}")
    t_start = time.perf_counter()
    shape = TINY if args.tiny else FULL
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    dtype = torch.bfloat16
    triton_ok = device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    configs = CONFIGS if device == "cuda" else [dict(block_s=16)]
    env = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "dtype": "bfloat16", "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        triton_ok = False
    blocks = build(shape, device, dtype)
    result = {"env": env, "shape": shape, "rows": []}
    print("correctness ...", file=sys.stderr)
    kernels = ("matmul", "chunked", "triton") if triton_ok else ("matmul", "chunked")
    result["check"] = check(blocks, shape, device, dtype, configs if triton_ok else [], kernels)
    print(json.dumps(result["check"], indent=1))
    cfg = {}
    if triton_ok:
        cfg, result["kernel_config_ms"] = pick_config(shape, device, dtype, configs, args.reps)
        print("kernel configurations (ms, attention alone):", json.dumps(result["kernel_config_ms"]))
    result["kernel_config"] = cfg
    methods = METHODS if triton_ok else tuple(x for x in METHODS if not x.startswith("triton"))
    if device != "cuda":  # Triton's CPU interpreter has no float8
        methods = tuple(x for x in methods if x != "triton-fp8")
    if args.methods:
        methods = tuple(x for x in methods if x in args.methods.split(","))
    deadline = t_start + args.time_budget
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save(rows):
        result["rows"] = rows
        result["wall_s"] = time.perf_counter() - t_start
        (out / "bench_absorbed.json").write_text(json.dumps(result, indent=1, default=str))

    save(measure(blocks, shape, device, dtype, cfg, args.reps, methods, deadline, save))
    if args.profile:
        result["profile"] = profile(blocks, shape, device, dtype, cfg, args.profile.split(","), shape["contexts"][-1])
        save(result["rows"])
    plot(result, out / "bench_absorbed.png")
    print(table(result["rows"]))
    print(f"correct: {result['check']['ok']} | kernel config {cfg} | {result['wall_s']:.0f} s | {out}")
    return 0 if result["check"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
