"""Absorbed decoding over encoder states kept in fp8, with fp8 tensor-core matmuls (issue 16).

The two-matmul path (`absorbed.attend_matmul`) reads the bf16 states twice per layer: 4 KiB per
context token and layer at LLaMA-2-7B shapes, and at 1M tokens that is most of a decoding step
(docs/benchmarks.md). Here the states are held in e4m3 fp8 with one float32 scale per token
(`stored_states.quantize_states`: +0.06% perplexity on the released adapter) in two layouts, since
`torch._scaled_mm` wants its second operand column-major:

- logits (R, S) = q8 (R, He) @ data^T, the data (S, He) row-major read as (He, S) column-major; the
  query's per-row scale and the states' per-token scale are applied by the matmul's row-wise scales;
- out (R, He) = p8 (R, S) @ data, the transposed copy (He, S) read as (S, He) column-major. The
  per-token scale is folded into the probabilities before they are quantized (each row to its own
  fp8 range), since a row-wise scale cannot sit on the reduced dimension; the rows' scales multiply
  the (R, He) product afterwards (a row-wise scaled matmul gets no split-K kernel over S).

So a step reads 2 x 1 byte per value instead of 2 x 2: the bytes of one bf16 read, for twice the
held memory of one fp8 copy (the same as bf16 states). The logits come out in bf16 and the
probabilities are rounded to fp8: tests pin the error against the float32 reference.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .stored_states import quantize_states

FP8 = torch.float8_e4m3fn
ALIGN = 16  # fp8 matmuls need every dimension a multiple of 16


@dataclass
class Fp8States:
    """Encoder states for fp8 decoding: data (B, S', He) and data_t (B, He, S') float8_e4m3fn,
    scale (B, S') float32 (0 on padding), length S (S' = S rounded up to a multiple of 16)."""

    data: torch.Tensor
    data_t: torch.Tensor
    scale: torch.Tensor
    length: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.data_t, self.scale))


def pack_fp8(states: torch.Tensor) -> Fp8States:
    """states (B, S, He) float -> `Fp8States` (per-token scales, padded to a multiple of 16 tokens)."""
    b, s, he = states.shape
    if he % ALIGN:
        raise ValueError(f"fp8 decoding needs the encoder width to be a multiple of {ALIGN}, got {he}")
    q = quantize_states(states, "fp8")
    pad = -s % ALIGN
    data = torch.nn.functional.pad(q.data.view(torch.uint8), (0, 0, 0, pad)).view(FP8)
    scale = torch.nn.functional.pad(q.scale.view(b, s), (0, pad))
    return Fp8States(data.contiguous(), data.transpose(1, 2).contiguous(), scale.contiguous(), s)


def _row_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (R, N) float -> (fp8 data, (R, 1) float32 scale): each row to the full fp8 range, as
    `quantize_states` scales each token."""
    q = quantize_states(x, "fp8")
    return q.data, q.scale


def probabilities_fp8(logits: torch.Tensor, token_scale: torch.Tensor, length: int,
                      key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The work between the two matmuls, as one function for `torch.compile` to fuse: logits (R, S')
    bf16, token_scale (S',) float32, the first `length` positions real, key_mask (length,) bool or
    None -> (p8 (R, S') e4m3: softmax times each token's scale, each row to the full fp8 range;
    p_scale (R, 1) float32). Rows with no real key give zeros."""
    real = torch.arange(logits.shape[-1], device=logits.device) < length
    if key_mask is not None:
        real = real & torch.nn.functional.pad(key_mask, (0, logits.shape[-1] - length))
    p = torch.softmax(logits.float().masked_fill(~real, float("-inf")), dim=-1).nan_to_num(nan=0.0) * token_scale
    p_scale = p.amax(dim=-1, keepdim=True).clamp_min(1e-30) / torch.finfo(FP8).max
    return (p / p_scale).to(FP8), p_scale


@functools.cache
def _fused_probabilities():
    # compiled once per process (dynamic: one graph for every context length); eager, the function
    # above makes about eight float32 passes over (R, S'), which is why the default path is in place
    return torch.compile(probabilities_fp8, dynamic=True)


def attend_fp8(q: torch.Tensor, packed: Fp8States, key_mask: torch.Tensor | None = None,
               fused: bool = False) -> torch.Tensor:
    """softmax(q states^T) states, as `absorbed.attend` computes it: q (B, R, He) pre-scaled,
    key_mask (B, S) bool or None. Returns (B, R, He) in q's dtype; rows with no real key give zeros.

    Between the two matmuls every pass over the (R, S) probabilities costs as much as a matmul's
    read at long contexts. By default they stay in bf16 (softmax accumulates in float32 inside) and
    are masked, scaled and quantized in place: about five passes, none of them float32. fused=True
    runs `probabilities_fp8` compiled instead (one or two fused kernels; the first call compiles)."""
    b, r, he = q.shape
    s = packed.length
    one = torch.ones((), device=q.device, dtype=torch.float32)
    out = torch.empty(b, r, he, device=q.device, dtype=torch.bfloat16)
    for i in range(b):  # decoding runs one context per row: B is small
        q8, q_scale = _row_fp8(q[i])
        logits = torch._scaled_mm(q8, packed.data[i].t(), scale_a=q_scale, scale_b=packed.scale[i].view(1, -1),
                                  out_dtype=torch.bfloat16)  # (R, S')
        probabilities = _fused_probabilities() if fused else _probabilities_in_place
        p8, p_scale = probabilities(logits, packed.scale[i], s, None if key_mask is None else key_mask[i])
        # the rows' scales go on after, on the small (R, He) product: cuBLAS has no split-K kernel
        # for row-wise scales, and this product reduces over all S tokens (2.3 ms instead of 0.27
        # at 1M tokens on the H200, docs/benchmarks.md); tensor-wise scales of one get split-K
        torch._scaled_mm(p8, packed.data_t[i].t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16, out=out[i])
        out[i].mul_(p_scale)
    return out.to(q.dtype)


def _probabilities_in_place(logits: torch.Tensor, token_scale: torch.Tensor, length: int,
                            key_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`probabilities_fp8` in bf16 and in place over `logits` (which it overwrites); p_scale bf16."""
    logits[:, length:] = float("-inf")  # the padding to 16
    if key_mask is not None:
        logits[:, :length].masked_fill_(~key_mask, float("-inf"))
    p = torch.softmax(logits, dim=-1)
    if key_mask is not None:
        p.nan_to_num_(nan=0.0)  # no real key: zeros
    p.mul_(token_scale)  # each token's scale, folded in before the rows are quantized
    # each row to the full fp8 range; a bf16 scale, so that dividing by it stays in place
    p_scale = (p.amax(dim=-1, keepdim=True).float().clamp_min(1e-30) / torch.finfo(FP8).max).bfloat16()
    return p.div_(p_scale).to(FP8), p_scale
