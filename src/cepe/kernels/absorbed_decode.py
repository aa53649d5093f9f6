"""Flash-decoding over encoder states: every absorbed query row against one (B, S, He) tensor.

A decoding step has few query rows (Hq heads x T tokens, e.g. 32) and a long context, so the work
is split over the context (split-K): each program takes one slice of the tokens, keeps a float32
running max, normaliser and weighted sum of states for its rows (an online softmax), and writes
them as partials; a combine step rescales the partials to the global max and adds them.

Each program holds all He output columns (a (BLOCK_R, He) float32 accumulator: 128 KiB at 32 rows
and He = 1,024), so each tile of states is loaded once and feeds both products, the logits and the
weighted sum. The row blocks of one slice are the fastest grid axis: a second row block finds the
tile in L2. An earlier layout split the output columns over programs, each recomputing the logits
from the whole tile: 2.4 ms a layer at 1M tokens on the H200 against 0.91 ms for this one
(docs/benchmarks.md, run 13).

TRANSPOSED computes the same products with the tokens as the matmuls' M dimension (logits^T =
states q^T, acc^T += states^T p^T), the shape Hopper's warpgroup MMA wants (M >= 64).

Launch: `attend_states(q, states, key_mask)`. CUDA, or CPU tensors under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Triton's CPU interpreter multiplies bf16 tiles as raw 16-bit integers (triton 3.9): there the
# tiles are upcast first. On the GPU the products run on tensor cores in the states' dtype.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# measured best on the H200 at 128K-1M tokens, He = 1,024, 32 rows (scripts/gpu/sweep_absorbed_kernel.py)
DEFAULT = dict(block_r=32, block_s=64, num_warps=8, num_stages=2, waves=1, transposed=False)


@triton.jit
def _partials_kernel(
    q_ptr, e_ptr, mask_ptr, scale_ptr, acc_ptr, m_ptr, l_ptr,
    R, S, HE, tokens_per_split,
    sq_b, sq_r, se_b, se_s, sm_b, ss_b, sa_b, sa_p, sa_r, sml_b, sml_p,
    HAS_MASK: tl.constexpr, HAS_SCALE: tl.constexpr, DOT_F32: tl.constexpr, TRANSPOSED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, HE_P2: tl.constexpr,
):
    pid_rb = tl.program_id(0)
    pid_split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # 64-bit offsets: 2 x 1M tokens x 1,024 overflows int32
    rows = pid_rb * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, HE_P2)
    row_ok = rows < R
    col_ok = cols < HE
    q = tl.load(q_ptr + b * sq_b + rows[:, None] * sq_r + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    start = pid_split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, S)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    if TRANSPOSED:
        acc = tl.zeros([HE_P2, BLOCK_R], tl.float32)
        q_t = tl.trans(q)
    else:
        acc = tl.zeros([BLOCK_R, HE_P2], tl.float32)
    e_base = e_ptr + b * se_b
    for s0 in range(start, end, BLOCK_S):
        toks = s0 + tl.arange(0, BLOCK_S)
        tok_ok = toks < end
        e = tl.load(e_base + toks.to(tl.int64)[:, None] * se_s + cols[None, :],
                    mask=tok_ok[:, None] & col_ok[None, :], other=0.0)
        e = e.to(q.dtype)  # 8-bit states are widened in registers: the bytes read are what they save
        valid = tok_ok
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + b * sm_b + toks, mask=tok_ok, other=0) != 0)
        if HAS_SCALE:  # states = data x per-token scale: the scale factors out of every product
            sc = tl.load(scale_ptr + b * ss_b + toks, mask=tok_ok, other=0.0)
        if TRANSPOSED:
            scores = tl.dot(e, q_t)  # (BLOCK_S, BLOCK_R)
            if HAS_SCALE:
                scores = scores * sc[:, None]
            scores = tl.where(valid[:, None], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing real yet: keep everything at 0
            p = tl.exp(scores - m_safe[None, :])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            if HAS_SCALE:
                p = p * sc[:, None]
            acc = acc * alpha[None, :] + tl.dot(tl.trans(e), p.to(e.dtype))
        else:
            scores = tl.dot(q, tl.trans(e))  # (BLOCK_R, BLOCK_S)
            if HAS_SCALE:
                scores = scores * sc[None, :]
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(scores - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if HAS_SCALE:
                p = p * sc[None, :]
            acc = acc * alpha[:, None] + tl.dot(p.to(e.dtype), e)
        m_i = m_new
    out = acc_ptr + b * sa_b + pid_split * sa_p
    if TRANSPOSED:
        tl.store(out + rows[None, :] * sa_r + cols[:, None], acc, mask=row_ok[None, :] & col_ok[:, None])
    else:
        tl.store(out + rows[:, None] * sa_r + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])
    tl.store(m_ptr + b * sml_b + pid_split * sml_p + rows, m_i, mask=row_ok)
    tl.store(l_ptr + b * sml_b + pid_split * sml_p + rows, l_i, mask=row_ok)


def combine(acc: torch.Tensor, m: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Partials acc (B, P, R, He), m and l (B, P, R) -> (B, R, He) float32: rescale every slice to
    the global max and normalise. A row with no real key anywhere gets zeros."""
    m_max = m.amax(dim=1, keepdim=True)
    m_safe = torch.where(torch.isinf(m_max), torch.zeros_like(m_max), m_max)
    w = torch.exp(m - m_safe)  # (B, P, R); 0 for slices with nothing real
    total = (w * l).sum(dim=1)  # (B, R)
    mixed = torch.einsum("bpr,bpre->bre", w, acc)
    return torch.where(total[..., None] > 0, mixed / total.clamp_min(1e-30)[..., None], torch.zeros_like(mixed))


def _programs() -> int:
    if torch.cuda.is_available():
        return 2 * torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return 4


def attend_states(q: torch.Tensor, states: torch.Tensor, key_mask: torch.Tensor | None = None, *,
                  state_scale: torch.Tensor | None = None, wide: torch.dtype | None = None,
                  block_r: int = DEFAULT["block_r"], block_s: int = DEFAULT["block_s"],
                  waves: int = DEFAULT["waves"], splits: int | None = None,
                  num_warps: int = DEFAULT["num_warps"], num_stages: int = DEFAULT["num_stages"],
                  transposed: bool = DEFAULT["transposed"]) -> torch.Tensor:
    """softmax(q states^T) states: q (B, R, He) pre-scaled, states (B, S, He), key_mask (B, S) bool
    or None. Returns (B, R, He) in q's dtype. 8-bit states: `states` int8 or float8_e4m3fn data
    and `state_scale` (B, S) or (B, S, 1) float32, one scale per token (`quantize_states`); they are
    widened in registers to `wide` (default bf16; fp16 converts from e4m3 in fewer instructions).

    splits: context slices per row block; default: 2 x `waves` programs per streaming
    multiprocessor in all, each slice a whole number of BLOCK_S tokens."""
    b, r, he = q.shape
    s = states.shape[1]
    if (states.dtype in (torch.int8, torch.float8_e4m3fn)) != (state_scale is not None):
        raise ValueError("8-bit states need state_scale, and only they take one")
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"queries must be a float type, got {q.dtype}")
    if states.stride(-1) != 1:
        states = states.contiguous()
    out_dtype = q.dtype
    if state_scale is None:
        q = q.to(states.dtype)
    elif not _INTERPRETED:
        q = q.to(wide or torch.bfloat16)
    q = q.contiguous()
    scale = state_scale.reshape(b, s).float().contiguous() if state_scale is not None else q
    block_r = max(16, min(block_r, triton.next_power_of_2(r)))
    n_rb = triton.cdiv(r, block_r)
    if splits is None:
        splits = max(1, waves * _programs() // (n_rb * b))
    splits = max(1, min(splits, triton.cdiv(s, block_s)))
    per_split = triton.cdiv(triton.cdiv(s, splits), block_s) * block_s
    splits = triton.cdiv(s, per_split)
    acc = torch.empty(b, splits, r, he, device=q.device, dtype=torch.float32)
    m = torch.empty(b, splits, r, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    mask = key_mask.to(torch.int8).contiguous() if key_mask is not None else q  # any pointer when unused
    _partials_kernel[(n_rb, splits, b)](
        q, states, mask, scale, acc, m, l,
        r, s, he, per_split,
        q.stride(0), q.stride(1), states.stride(0), states.stride(1),
        mask.stride(0) if key_mask is not None else 0, scale.stride(0) if state_scale is not None else 0,
        acc.stride(0), acc.stride(1), acc.stride(2), m.stride(0), m.stride(1),
        HAS_MASK=key_mask is not None, HAS_SCALE=state_scale is not None, DOT_F32=_INTERPRETED,
        TRANSPOSED=transposed, BLOCK_R=block_r, BLOCK_S=block_s, HE_P2=triton.next_power_of_2(he),
        num_warps=num_warps, num_stages=num_stages,
    )
    return combine(acc, m, l).to(out_dtype)
