"""Flash-decoding over encoder states: every absorbed query row against one (B, S, He) tensor.

A decoding step has few query rows (Hq heads x T tokens, e.g. 32) and a long context, so the work
is split over the context (split-K): each program takes one slice of the tokens, keeps a float32
running max, normaliser and weighted sum of states for all its rows (an online softmax), and writes
them as partials; a combine step rescales the partials to the global max and adds them. Each
block of states is loaded once per program and used twice, for the logits and for the weighted sum.

The output width He (1,024 for LLaMA-2-7B's encoder) is too wide for one program's float32
accumulator at 32 rows, so programs also split the output columns (BLOCK_DV); the programs of one
context slice differ only in their columns and run side by side (the fastest grid axis), so the
states they all read for the logits come from L2, and HBM sees each block about once.

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


@triton.jit
def _partials_kernel(
    q_ptr, e_ptr, mask_ptr, scale_ptr, acc_ptr, m_ptr, l_ptr,
    R, S, HE, tokens_per_split, n_row_blocks,
    sq_b, sq_r, se_b, se_s, sm_b, ss_b, sa_b, sa_p, sa_r, sml_b, sml_p,
    HAS_MASK: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_F32: tl.constexpr,
):
    pid_dv = tl.program_id(0)
    pid_split = tl.program_id(1)
    pid_br = tl.program_id(2)
    b = (pid_br // n_row_blocks).to(tl.int64)  # 64-bit offsets: 2 x 1M tokens x 1,024 overflows int32
    rows = (pid_br % n_row_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    row_ok = rows < R
    start = pid_split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, S)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    q_base = q_ptr + b * sq_b + rows[:, None] * sq_r
    e_base = e_ptr + b * se_b
    for s0 in range(start, end, BLOCK_S):
        toks = s0 + tl.arange(0, BLOCK_S)
        tok_ok = toks < end
        tok_off = toks.to(tl.int64)[:, None] * se_s
        scores = tl.zeros([BLOCK_R, BLOCK_S], tl.float32)
        for e0 in range(0, HE, BLOCK_E):
            dims = e0 + tl.arange(0, BLOCK_E)
            dim_ok = dims < HE
            q = tl.load(q_base + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
            e = tl.load(e_base + tok_off + dims[None, :], mask=tok_ok[:, None] & dim_ok[None, :], other=0.0)
            if DOT_F32:
                q, e = q.to(tl.float32), e.to(tl.float32)
            else:  # 8-bit states are widened in registers: the bytes read are what they save
                e = e.to(q.dtype)
            scores += tl.dot(q, tl.trans(e))
        if HAS_SCALE:  # states = data x per-token scale: the scale factors out of every product
            sc = tl.load(scale_ptr + b * ss_b + toks, mask=tok_ok, other=0.0)
            scores = scores * sc[None, :]
        valid = tok_ok
        if HAS_MASK:
            real = tl.load(mask_ptr + b * sm_b + toks, mask=tok_ok, other=0)
            valid = valid & (real != 0)
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing real yet: keep everything at 0
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        ev = tl.load(e_base + tok_off + cols[None, :], mask=tok_ok[:, None] & (cols[None, :] < HE), other=0.0)
        pw = p
        if HAS_SCALE:
            pw = p * sc[None, :]
        if DOT_F32:
            acc = acc * alpha[:, None] + tl.dot(pw, ev.to(tl.float32))
        else:
            cdt = q_ptr.dtype.element_ty
            acc = acc * alpha[:, None] + tl.dot(pw.to(cdt), ev.to(cdt))
        m_i = m_new
    out = acc_ptr + b * sa_b + pid_split * sa_p + rows[:, None] * sa_r + cols[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & (cols[None, :] < HE))
    if pid_dv == 0:
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
                  state_scale: torch.Tensor | None = None,
                  block_r: int = 32, block_s: int = 64, block_e: int = 128, block_dv: int = 256,
                  splits: int | None = None, num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """softmax(q states^T) states: q (B, R, He) pre-scaled, states (B, S, He), key_mask (B, S) bool
    or None. Returns (B, R, He) in q's dtype. 8-bit states: `states` int8 or float8_e4m3fn data
    and `state_scale` (B, S) or (B, S, 1) float32, one scale per token (`quantize_states`).

    splits: context slices per (row block, column block); default: enough programs for two waves
    over the device's SMs, each slice a whole number of BLOCK_S tokens."""
    b, r, he = q.shape
    s = states.shape[1]
    if states.stride(-1) != 1:
        states = states.contiguous()
    out_dtype = q.dtype
    if state_scale is None:
        q = q.to(states.dtype)
    elif q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"queries must be a float type, got {q.dtype}")
    q = q.contiguous()
    scale = state_scale.reshape(b, s).float().contiguous() if state_scale is not None else q
    block_r = max(16, min(block_r, triton.next_power_of_2(r)))
    block_dv = max(16, min(block_dv, triton.next_power_of_2(he)))
    block_e = max(16, min(block_e, triton.next_power_of_2(he)))
    n_rb, n_dv = triton.cdiv(r, block_r), triton.cdiv(he, block_dv)
    if splits is None:
        splits = max(1, _programs() // (n_dv * n_rb * b))
    splits = max(1, min(splits, triton.cdiv(s, block_s)))
    per_split = triton.cdiv(triton.cdiv(s, splits), block_s) * block_s
    splits = triton.cdiv(s, per_split)
    acc = torch.empty(b, splits, r, he, device=q.device, dtype=torch.float32)
    m = torch.empty(b, splits, r, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    mask = key_mask.to(torch.int8).contiguous() if key_mask is not None else q  # any pointer when unused
    _partials_kernel[(n_dv, splits, b * n_rb)](
        q, states, mask, scale, acc, m, l,
        r, s, he, per_split, n_rb,
        q.stride(0), q.stride(1), states.stride(0), states.stride(1),
        mask.stride(0) if key_mask is not None else 0, scale.stride(0) if state_scale is not None else 0,
        acc.stride(0), acc.stride(1), acc.stride(2), m.stride(0), m.stride(1),
        DOT_F32=_INTERPRETED, HAS_MASK=key_mask is not None, HAS_SCALE=state_scale is not None,
        BLOCK_R=block_r, BLOCK_S=block_s, BLOCK_E=block_e, BLOCK_DV=block_dv,
        num_warps=num_warps, num_stages=num_stages,
    )
    return combine(acc, m, l).to(out_dtype)
