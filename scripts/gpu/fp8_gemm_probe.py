"""Where fp8 decoding's time goes on a GPU (issue 16): `torch._scaled_mm` alone, by operand order
and scale kind, then `attend_fp8` against a row-wise-scaled variant and two bf16 matmuls.

    PYTHONPATH=src python3 scripts/gpu/fp8_gemm_probe.py   # ~20 s on an H200; docs/bench/run10/fp8_gemm.md

Times are CUDA-event means over eager calls (no CUDA graph), in ms."""

from __future__ import annotations

import torch

from cepe.model.absorbed_fp8 import FP8, Fp8States, _probabilities_in_place, _row_fp8, attend_fp8, pack_fp8


def timed(fn, *args, **kwargs) -> float:
    """Mean ms of fn(*args, **kwargs) over 30 calls after one warm-up."""
    fn(*args, **kwargs)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(30):
        fn(*args, **kwargs)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 30


def attend_rowwise(q: torch.Tensor, packed: Fp8States) -> torch.Tensor:
    """`attend_fp8` as first built: the probabilities' row scales inside the second matmul (the
    one difference from `attend_fp8` now, whose passes between the matmuls it shares)."""
    out = torch.empty_like(q, dtype=torch.bfloat16)
    ones = torch.ones(1, q.shape[-1], device=q.device)
    for i in range(q.shape[0]):
        q8, q_scale = _row_fp8(q[i])
        logits = torch._scaled_mm(q8, packed.data[i].t(), scale_a=q_scale, scale_b=packed.scale[i].view(1, -1),
                                  out_dtype=torch.bfloat16)
        p8, p_scale = _probabilities_in_place(logits, packed.scale[i], packed.length, None)
        torch._scaled_mm(p8, packed.data_t[i].t(), scale_a=p_scale.float(), scale_b=ones,
                         out_dtype=torch.bfloat16, out=out[i])
    return out


def bf16_attention(q: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """q (R, He), states (S, He) -> (R, He): the two bf16 matmuls with a softmax between them."""
    return torch.softmax(q @ states.t(), -1) @ states


def gemms(he: int, s: int, rows: tuple[int, ...]) -> None:
    data = torch.randn(s, he, device="cuda").to(FP8)
    data_t = data.t().contiguous()
    scale = torch.rand(s, device="cuda") + 0.5
    one = torch.ones((), device="cuda")
    states = torch.randn(s, he, device="cuda", dtype=torch.bfloat16)
    for r in rows:
        q8, q_scale = torch.randn(r, he, device="cuda").to(FP8), torch.ones(r, 1, device="cuda")
        p8, pb = torch.randn(r, s, device="cuda").to(FP8), torch.randn(r, s, device="cuda", dtype=torch.bfloat16)
        qb = torch.randn(r, he, device="cuda", dtype=torch.bfloat16)
        mm, bf = torch._scaled_mm, torch.bfloat16
        row_ones = torch.ones(1, he, device="cuda")
        got = {
            "qk row-wise": timed(mm, q8, data.t(), scale_a=q_scale, scale_b=scale.view(1, -1), out_dtype=bf),
            "qk tensor-wise": timed(mm, q8, data.t(), scale_a=one, scale_b=one, out_dtype=bf),
            "qk bf16": timed(torch.matmul, qb, states.t()),
            "pv row-wise": timed(mm, p8, data_t.t(), scale_a=q_scale, scale_b=row_ones, out_dtype=bf),
            "pv tensor-wise": timed(mm, p8, data_t.t(), scale_a=one, scale_b=one, out_dtype=bf),
            "pv bf16": timed(torch.matmul, pb, states),
        }
        print(f"matmuls He={he} S={s} R={r}: " + "  ".join(f"{k} {v:.3f}" for k, v in got.items()), flush=True)


def attention(he: int, s: int, rows: tuple[int, ...]) -> None:
    states = torch.randn(1, s, he, device="cuda", dtype=torch.bfloat16)
    packed = pack_fp8(states)
    for r in rows:
        q = torch.randn(1, r, he, device="cuda", dtype=torch.bfloat16) * 0.05
        ref = torch.softmax(q[0].float() @ states[0].float().t(), -1) @ states[0].float()
        err = {name: ((f(q, packed)[0].float() - ref).norm() / ref.norm()).item()
               for name, f in (("row-wise", attend_rowwise), ("now", attend_fp8))}
        got = {"row-wise": timed(attend_rowwise, q, packed), "attend_fp8": timed(attend_fp8, q, packed),
               "bf16": timed(bf16_attention, q[0], states[0])}
        print(f"attention He={he} S={s} R={r}: " + "  ".join(f"{k} {v:.3f}" for k, v in got.items())
              + f"  | error vs float32: row-wise {err['row-wise']:.4f}, now {err['now']:.4f}", flush=True)


if __name__ == "__main__":
    gemms(1024, 1 << 20, (16, 32, 64, 128))
    gemms(4096, 1 << 18, (16, 32, 64, 128))
    attention(1024, 1 << 20, (8, 32, 64))
