"""`kv_policy="absorbed"` against `cache` through the whole model (issue 16): per context length, the
peak memory and eager time per decoding step of each policy, greedy-token agreement, and every
step's logits teacher-forced on the `cache` run's tokens (relative error, argmax agreement).

    PYTHONPATH=src python3 scripts/gpu/check_absorbed_policy.py --preset llama2-7b \
        --context 16K,128K,512K,1024K --out $OUT
    PYTHONPATH=src python3 scripts/gpu/check_absorbed_policy.py --preset tiny --context 512 --device cpu

The context is encoded once per length with grad off, then each run gets a fresh `ContextStates`
over those states (a run under `cache` fills its context with keys/values, which a later run would
read). Encoding with grad on kept the encoder's autograd graph alive: ~1.1 MB per context token at
LLaMA-2-7B shapes, 149 GB at 128K (the run that went out of memory). `cache` is skipped where its
keys/values would not fit (`--cache-budget-gb`); `absorbed` then runs alone.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from cepe import ContextStates
from cepe.benchmarks.cli import _lengths
from cepe.benchmarks.presets import build_model, get_spec
from cepe.benchmarks.scoring import make_inputs
from cepe.model import decoding

GB = 1e9
HEADROOM_GB = 8.0  # prefill and step transients beyond the kept keys/values (a 1M prefill: ~5 GB)


@torch.no_grad()
def encode(model, inputs) -> ContextStates:
    """The context's encoder states, without the autograd graph the encoder's trainable weights
    would otherwise record (every layer's activations, kept as long as the states are)."""
    return model.encode(inputs.context_ids, inputs.context_mask)


def fresh(ctx: ContextStates) -> ContextStates:
    """The same states with an empty cross-attention cache: nothing another run projected."""
    return ContextStates(ctx.hidden_states, ctx.attention_mask, ctx.encoder_hash)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / GB if device == "cuda" else None


@torch.no_grad()
def decode_run(model, policy: str, prompt: torch.Tensor, ctx: ContextStates, steps: int,
               forced: torch.Tensor | None = None) -> dict:
    """Greedy decoding through the library's loop (`decoding.Batch`) under `policy`: `steps` tokens,
    each the argmax of the logits before it, or the next of `forced` (steps,) when given (teacher
    forcing). Returns tokens (steps,), logits (steps, V) float32 on the CPU (the prefill's first),
    prefill seconds and each later step's seconds."""
    device = prompt.device.type
    model.config.kv_policy = policy
    batch = decoding.Batch(model, 0, context=ctx)
    t0 = time.perf_counter()
    logits = batch.prefill([prompt[0].tolist()])
    _sync(device)
    prefill_s, step_s, rows, tokens = time.perf_counter() - t0, [], [], []
    for i in range(steps):
        rows.append(logits[0].cpu())
        tokens.append(int(logits[0].argmax()) if forced is None else int(forced[i]))
        if i == steps - 1:
            break
        t0 = time.perf_counter()
        logits = batch.step(torch.tensor([tokens[-1]], device=prompt.device))
        _sync(device)
        step_s.append(time.perf_counter() - t0)
    return {"tokens": torch.tensor(tokens), "logits": torch.stack(rows), "prefill_s": prefill_s, "step_s": step_s}


def policy_runs(model, policy: str, prompt: torch.Tensor, ctx: ContextStates, steps: int,
                forced: torch.Tensor | None) -> dict:
    """A free greedy run (and a run teacher-forced on `forced`, when given), each on a fresh
    context; the peak memory over both; status "ok" or "oom" (the runs' tensors freed)."""
    device = prompt.device.type
    _reset_peak(device)
    try:
        free = decode_run(model, policy, prompt, fresh(ctx), steps)
        tf = None if forced is None else decode_run(model, policy, prompt, fresh(ctx), steps, forced)
    except torch.cuda.OutOfMemoryError as e:
        return {"status": "oom: " + str(e).splitlines()[0], "peak_gb": _peak_gb(device)}
    return {"status": "ok", "free": free, "forced": tf, "peak_gb": _peak_gb(device),
            "prefill_s": free["prefill_s"],
            "step_ms": 1e3 * statistics.median(free["step_s"]) if free["step_s"] else None}


def compare(cache: dict, absorbed: dict) -> dict:
    """Greedy agreement of the two free runs; `absorbed` teacher-forced on `cache`'s tokens against
    `cache`'s own logits: relative error ||l_a - l_c|| / ||l_c|| per position (the prefill, then the
    decoding steps), argmax agreement, and the smallest top-2 margin of `cache`'s logits (random
    weights give near-ties, where bf16 rounding alone can flip an argmax)."""
    ts, ta = cache["free"]["tokens"], absorbed["free"]["tokens"]
    lc, la = cache["free"]["logits"], absorbed["forced"]["logits"]
    rel = (la - lc).norm(dim=-1) / lc.norm(dim=-1)
    steps = rel[1:] if len(rel) > 1 else rel
    top2 = lc.topk(2, dim=-1).values
    return dict(same_tokens=bool(torch.equal(ts, ta)), tokens_agreeing=int((ts == ta).long().cumprod(0).sum()),
                prefill_rel_err=float(rel[0]), max_step_rel_err=float(steps.max()),
                mean_step_rel_err=float(steps.mean()), max_abs_err=float((la - lc).abs().max()),
                forced_argmax_agree=int((la.argmax(-1) == lc.argmax(-1)).sum()), forced_steps=len(rel),
                min_top2_margin=float((top2[:, 0] - top2[:, 1]).min()))


def cache_fits(model, ctx: ContextStates, budget_gb: float | None) -> tuple[bool, float]:
    """Whether `cache`'s keys/values (+ `HEADROOM_GB`) fit `budget_gb` (None: the device's free
    memory; the CPU: always); also the keys/values' GB."""
    need = model.cross_kv_cache_bytes(ctx) / GB
    if budget_gb is None:
        if not ctx.hidden_states.is_cuda:
            return True, need
        budget_gb = torch.cuda.mem_get_info()[0] / GB
    return need + HEADROOM_GB <= budget_gb, need


def check_length(model, args, context: int, dtype: torch.dtype) -> dict:
    """One context length: encode once, then `cache` (where it fits) and `absorbed`."""
    inputs = make_inputs(model, context + args.prompt, args.prompt, args.device)
    _reset_peak(args.device)
    t0 = time.perf_counter()
    ctx = encode(model, inputs)
    _sync(args.device)
    row = dict(preset=args.preset, context=context, dtype=str(dtype), prompt=args.prompt, new_tokens=args.new_tokens,
               encode_s=time.perf_counter() - t0, encode_peak_gb=_peak_gb(args.device),
               states_gb=ctx.hidden_states.numel() * ctx.hidden_states.element_size() / GB)
    fits, kv_gb = cache_fits(model, ctx, args.cache_budget_gb)
    row["cache_kv_gb"] = kv_gb
    runs = {}
    if fits:
        runs["cache"] = policy_runs(model, "cache", inputs.decoder_ids, ctx, args.new_tokens, None)
    else:
        runs["cache"] = {"status": f"skipped: {kv_gb:.1f} GB of keys/values + {HEADROOM_GB:.0f} GB do not fit"}
    forced = runs["cache"]["free"]["tokens"] if runs["cache"]["status"] == "ok" else None
    runs["absorbed"] = policy_runs(model, "absorbed", inputs.decoder_ids, ctx, args.new_tokens, forced)
    for policy, r in runs.items():
        for key in ("status", "peak_gb", "step_ms", "prefill_s"):
            row[f"{key}_{policy}"] = r.get(key)
    ok = all(r["status"] == "ok" for r in runs.values())
    row.update(compare(runs["cache"], runs["absorbed"]) if ok else {})
    return row


def table(rows: list[dict]) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = ["context | peak GB cache / absorbed | ms/step cache / absorbed | step rel err max (mean) | "
             "forced argmax | greedy agree"]
    for r in rows:
        lines.append(
            f"{r['context']:>7} | {f(r.get('peak_gb_cache'), '.1f')} / {f(r.get('peak_gb_absorbed'), '.1f')} | "
            f"{f(r.get('step_ms_cache'), '.1f')} / {f(r.get('step_ms_absorbed'), '.1f')} | "
            f"{f(r.get('max_step_rel_err'), '.2e')} ({f(r.get('mean_step_rel_err'), '.2e')}) | "
            f"{r.get('forced_argmax_agree', '-')}/{r.get('forced_steps', '-')} | "
            f"{r.get('tokens_agreeing', '-')}/{r['new_tokens']}"
            + ("" if r["status_cache"] == "ok" else f"  (cache {r['status_cache']})"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama2-7b")
    ap.add_argument("--context", type=_lengths, default=(131072,), help="context tokens, e.g. 16K,128K,1024K")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), help="default: bfloat16 on cuda, float32 elsewhere")
    ap.add_argument("--cache-budget-gb", type=float,
                    help="skip `cache` where its keys/values + 8 GB exceed this (default: free device memory)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    model = build_model(get_spec(args.preset), args.device, dtype)
    rows = []
    for context in tqdm(args.context, desc="context lengths"):
        rows.append(check_length(model, args, context, dtype))
        tqdm.write(json.dumps(rows[-1]))
        if args.out:  # after every length: a later one running out of time leaves these
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "check_absorbed_policy.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
