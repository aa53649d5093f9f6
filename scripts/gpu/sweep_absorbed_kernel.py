"""Tune the absorbed-decoding kernel (`attend_states`) on the GPU (issue 16).

One decoding step's attention over encoder states at LLaMA-2-7B shapes (32 absorbed query rows,
He = 1,024, batch 1), random data, each call captured as a CUDA graph (`bench_absorbed.time_step`).
For bf16 states and fp8 states widened in registers to bf16 or fp16: every configuration at the
longest context, then the best few at every context, against two bf16 matmuls, the fp8 matmuls with
fused passes (`attend_fp8(fused=True)`) and the kernel's default configuration.
Relative error of each against float32 attention over the same (dequantized) states.

    PYTHONPATH=src python3 scripts/gpu/sweep_absorbed_kernel.py --out $OUT          # H200, ~5 min
    PYTHONPATH=src TRITON_INTERPRET=1 python3 scripts/gpu/sweep_absorbed_kernel.py --tiny --out /tmp/sw
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_absorbed import _name, rel_err, time_step  # noqa: E402

from cepe.kernels.absorbed_decode import attend_states  # noqa: E402
from cepe.model.absorbed import attend  # noqa: E402
from cepe.model.absorbed_fp8 import attend_fp8, pack_fp8  # noqa: E402
from cepe.model.stored_states import quantize_states  # noqa: E402

GRID = dict(block_r=(32,), block_s=(32, 64), num_warps=(8, 16), num_stages=(1, 2), transposed=(0, 1))


def configs(tiny: bool) -> list[dict]:
    if tiny:
        return [dict(block_r=16, block_s=16, num_warps=4, num_stages=2, transposed=t) for t in (0, 1)]
    keys = list(GRID)
    return [dict(zip(keys, v)) for v in itertools.product(*(GRID[k] for k in keys))]


def name(mode: str, cfg: dict) -> str:
    return f"{mode}:{_name(cfg)}"


def time_context(s, ci, r, he, device, dtype, reps, args, t_start, grid, best) -> tuple[dict, dict]:
    """Every method and configuration at one context length: ({name: {ms, spread, rel_err, tb_s_read}},
    {name of a kernel configuration: (mode, its keyword arguments)})."""
    g = torch.Generator(device=device).manual_seed(ci)
    states = torch.randn(1, s, he, device=device, dtype=dtype, generator=g)
    q = torch.randn(1, r, he, device=device, dtype=dtype, generator=g) * 0.05
    q8 = quantize_states(states, "fp8" if device == "cuda" else "int8")
    truth = attend(q.float(), states.float(), kernel="chunked")
    truth8 = attend(q.float(), q8.dequantize().float(), kernel="chunked")
    runs = {
        "matmul": (lambda: attend(q, states, kernel="matmul"), truth),
        "kernel-default": (lambda: attend_states(q, states, None), truth),
    }
    if device == "cuda":
        packed = pack_fp8(states)
        runs["fp8mm-fused"] = (lambda: attend_fp8(q, packed, None, fused=True), truth8)
    modes = {"bf16": (states, {}), "fp8w": (q8.data, dict(state_scale=q8.scale))}
    if device == "cuda":
        modes["fp8w16"] = (q8.data, dict(state_scale=q8.scale, wide=torch.float16))
    cfgs = {}
    for mode, (st, kw) in modes.items():
        for cfg in (grid if grid is not None else best.get(mode, [])):
            cfgs[name(mode, cfg)] = (mode, cfg)
            runs[name(mode, cfg)] = (lambda st=st, kw=kw, cfg=cfg: attend_states(q, st, None, **kw, **cfg),
                                     truth if mode == "bf16" else truth8)
    row = {}
    for key, (fn, ref) in runs.items():
        if time.perf_counter() - t_start > args.budget_s:
            row[key] = "skipped: time budget"
            continue
        try:
            err = rel_err(fn(), ref)
            t = time_step(fn, device, reps)
            row[key] = {"ms": t["ms"], "spread": t["spread"], "rel_err": err,
                        "tb_s_read": (s * he * (1 if "fp8" in key else 2)) / (t["ms"] * 1e-3) / 1e12}
        except Exception as e:  # a configuration that does not compile (shared memory) is reported
            row[key] = f"{type(e).__name__}: {str(e)[:160]}"
        v = row[key]
        print(f"{s:>8} {key:<74} " + (v if isinstance(v, str) else f"{v['ms']:.4f} ms, err {v['rel_err']:.4f}"),
              flush=True)
    return row, cfgs


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--budget-s", type=float, default=360.0, help="stop starting new timings after this")
    ap.add_argument("--top", type=int, default=3)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    r, he = (32, 1024) if not args.tiny else (8, 64)
    contexts = [1 << 20, 128 << 10, 256 << 10, 512 << 10] if not args.tiny else [1000, 300]
    reps = 10 if not args.tiny else 1
    t_start = time.perf_counter()
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "rows": r, "width": he, "contexts": {}}
    out_json = args.out / "sweep_absorbed_kernel.json"

    def save():
        out_json.write_text(json.dumps(result, indent=1))

    best: dict[str, list] = {}
    for ci, s in enumerate(contexts):
        row, cfgs = time_context(s, ci, r, he, device, dtype, reps, args, t_start,
                                 configs(args.tiny) if ci == 0 else None, best)
        result["contexts"][str(s)] = row
        save()
        if ci == 0:  # the best few of each mode go on to the other contexts
            for mode in ("bf16", "fp8w", "fp8w16"):
                ok = sorted((v["ms"], k) for k, v in row.items()
                            if k in cfgs and cfgs[k][0] == mode and isinstance(v, dict) and v["rel_err"] < 0.1)
                best[mode] = [cfgs[k][1] for _, k in ok[:args.top]]
            result["best"] = best
        if device == "cuda":
            torch.cuda.empty_cache()
    save()
    print(f"\n{'context':>8} " + " ".join(f"{k[:26]:>26}" for k in result["contexts"][str(contexts[-1])]))
    for s, row in result["contexts"].items():
        print(f"{int(s):>8} " + " ".join(f"{(v['ms'] if isinstance(v, dict) else float('nan')):>26.4f}"
                                         for v in row.values()))
    print(f"wrote {out_json} in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
