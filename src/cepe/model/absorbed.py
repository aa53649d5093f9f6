"""Cross-attention read straight from the encoder states, with the key/value projections absorbed.

`CrossAttention` has no rotary positions and no key norm, so its keys and values are linear in
the encoder states e_s (He wide):

    score(h, s) = c * q_h . (W_k[g] e_s) = c * (W_k[g]^T q_h) . e_s       (g: the kv head of head h)
    out_h       = sum_s p_hs W_v[g] e_s  = W_v[g] (sum_s p_hs e_s)

so a decoding step can attend over the states themselves: every query head becomes an "absorbed
query" W_k[g]^T q_h of width He, all heads read the same (B, S, He) states (multi-query attention
with He-wide heads, as DeepSeek's MLA decodes its latent cache), and the He-wide result is mapped
back through W_v[g] and the output projection. The states are shared by every layer: He values per
context token to keep, instead of 2 x Hkv x d per layer.

Kernels for the attention over states (`attend`):
- "matmul": two plain matmuls (scores, then probabilities x states); reads the states twice.
- "chunked": the same, chunk by chunk over the context with an online softmax (bounded memory).
- "triton": a flash-decoding kernel (`cepe.kernels.absorbed_decode`) that reads the states once,
  split over the context with a combine step; CUDA, or the CPU under TRITON_INTERPRET=1. The
  `absorbed` policy's default on CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .absorbed_fp8 import Fp8States, attend_fp8
from .cross_attention import CrossAttention
from .stored_states import QuantizedStates

if TYPE_CHECKING:
    from .context import ContextStates

KERNELS = ("auto", "matmul", "chunked", "triton")


@dataclass(frozen=True)
class AbsorbedWeights:
    """One block's weights rearranged for attention over encoder states (computed once per block).

    form "factored" (decoding): key (Hkv, d, He) = c * W_k per kv head (c: the softmax scale),
        value (Hkv, d, He) = W_v per kv head; the block's own q_proj/o_proj do the rest.
    form "fused": query_key (Hq*He, H) = c * W_k[g(h)]^T W_q[h] stacked over heads,
        value_out (H, Hq*He) = W_o[:, h] W_v[g(h)] side by side: one matmul in, one out.
    """

    form: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    encoder_hidden_size: int
    key: torch.Tensor | None = None
    value: torch.Tensor | None = None
    query_key: torch.Tensor | None = None
    value_out: torch.Tensor | None = None


def absorbed_weight_reads(block: CrossAttention) -> dict[str, int]:
    """Weights one query token reads (= multiply-adds) in each form, all heads.

    factored: W_q and W_o (Hq*d*H each) + W_k and W_v (Hkv*d*He each).
    fused: the two Hq*He*H products. With H = 4096, Hq = 32, d = 128, Hkv = 8, He = 1024 (LLaMA-2-7B)
    that is 35.7 M against 268 M: fusing multiplies a decoding step's weight reads by 7.5, because
    the products are He/d = 8 times wider than W_q and W_o. Fusing only pays when He < d roughly,
    i.e. an encoder narrower than one head."""
    hq, hkv, d = block.num_heads, block.num_kv_heads, block.head_dim
    h, he = block.q_proj.in_features, block.k_proj.in_features
    return {"factored": 2 * hq * d * h + 2 * hkv * d * he, "fused": 2 * hq * he * h}


@torch.no_grad()
def absorb(block: CrossAttention, form: str = "auto") -> AbsorbedWeights:
    """Precompute a block's absorbed weights. form: "factored", "fused" or "auto" (the one whose
    decoding step reads fewer weights, `absorbed_weight_reads`; the factored one at every real shape).

    Decoding has T (1..a few) query rows, so it is bound by the weights and states it reads, not by
    FLOPs: the cheaper association is the one with fewer weight elements, and for He > d that is
    q~ = W_k^T (W_q x), never the (He x H) product W_k^T W_q."""
    if form == "auto":
        reads = absorbed_weight_reads(block)
        form = "fused" if reads["fused"] < reads["factored"] else "factored"
    if form not in ("factored", "fused"):
        raise ValueError(f"form must be 'auto', 'factored' or 'fused', got {form!r}")
    hq, hkv, d = block.num_heads, block.num_kv_heads, block.head_dim
    he, dtype = block.k_proj.in_features, block.k_proj.weight.dtype
    wk = block.k_proj.weight.float().view(hkv, d, he) * block.scaling
    wv = block.v_proj.weight.float().view(hkv, d, he)
    base = dict(form=form, num_heads=hq, num_kv_heads=hkv, head_dim=d, encoder_hidden_size=he)
    if form == "factored":
        return AbsorbedWeights(**base, key=wk.to(dtype).contiguous(), value=wv.to(dtype).contiguous())
    g = hq // hkv
    wq = block.q_proj.weight.float().view(hkv, g, d, -1)  # head h = kv * g + j, as CrossAttention groups them
    wo = block.o_proj.weight.float().view(-1, hkv, g, d)
    query_key = torch.einsum("kde,kjdh->kjeh", wk, wq).reshape(hq * he, -1)
    value_out = torch.einsum("okjd,kde->okje", wo, wv).reshape(wo.shape[0], hq * he)
    return AbsorbedWeights(**base, query_key=query_key.to(dtype).contiguous(),
                           value_out=value_out.to(dtype).contiguous())


def absorbed_queries(block: CrossAttention, weights: AbsorbedWeights, hidden_states: torch.Tensor,
                     logit_scale: torch.Tensor | None = None) -> torch.Tensor:
    """hidden_states (B, T, H) -> absorbed queries (B, Hq*T, He), rows ordered (head, token), with
    the softmax scale and the per-row logit scale (B,) folded in."""
    b, t, _ = hidden_states.shape
    x = block.norm(hidden_states)
    hq, hkv, he = weights.num_heads, weights.num_kv_heads, weights.encoder_hidden_size
    if weights.form == "fused":
        q = torch.nn.functional.linear(x, weights.query_key).view(b, t, hq, he).transpose(1, 2)
    else:
        q = block.q_proj(x).view(b, t, hkv, hq // hkv, weights.head_dim)
        q = torch.einsum("btkjd,kde->bkjte", q, weights.key)
    q = q.reshape(b, hq * t, he)
    if logit_scale is not None:
        q = q * logit_scale.to(q.dtype).view(b, 1, 1)
    return q


def absorbed_output(block: CrossAttention, weights: AbsorbedWeights, mixed: torch.Tensor, t: int) -> torch.Tensor:
    """mixed (B, Hq*T, He): each head's probability-weighted sum of states -> delta (B, T, H)."""
    b = mixed.shape[0]
    hq, hkv, he = weights.num_heads, weights.num_kv_heads, weights.encoder_hidden_size
    if weights.form == "fused":
        z = mixed.view(b, hq, t, he).transpose(1, 2).reshape(b, t, hq * he)
        return torch.nn.functional.linear(z, weights.value_out)
    z = mixed.view(b, hkv, hq // hkv, t, he)
    v = torch.einsum("bkjte,kde->btkjd", z, weights.value).reshape(b, t, hq * weights.head_dim)
    return block.o_proj(v)


def absorbed_cross_attention(
    block: CrossAttention,
    hidden_states: torch.Tensor,
    encoder_states: torch.Tensor | QuantizedStates | Fp8States,
    key_mask: torch.Tensor | None = None,
    logit_scale: torch.Tensor | None = None,
    *,
    weights: AbsorbedWeights | None = None,
    kernel: str = "auto",
    topk: int | None = None,
) -> torch.Tensor:
    """The delta `block(h, *block.project_kv(s), key_mask, logit_scale)` returns, up to float
    rounding, computed from the encoder states without per-layer keys/values.

    hidden_states (B, T, H); encoder_states (B, S, He), or 8-bit `QuantizedStates` (the Triton
    kernel reads the 8-bit data; the PyTorch paths dequantize first), or `Fp8States` (read by fp8
    matmuls, `absorbed_fp8`; kernel "compiled" or anything else for the eager passes); key_mask
    (B, S) bool (True = real token) or None; logit_scale (B,) or None; weights: `absorb(block)`
    (computed here when None: pass them in when decoding); topk: each query row reads only its k
    highest-scoring states (`attend_topk`, whatever the kernel; not from `Fp8States`). Returns
    (B, T, H); rows whose context is all padding get a zero delta."""
    weights = weights if weights is not None else absorb(block)
    q = absorbed_queries(block, weights, hidden_states, logit_scale)
    if topk is not None:
        if isinstance(encoder_states, Fp8States):
            raise ValueError("top-k attention reads native or 8-bit states, not Fp8States")
        if isinstance(encoder_states, QuantizedStates):
            encoder_states = encoder_states.dequantize()
        mixed = attend_topk(q, encoder_states.to(block.k_proj.weight.dtype), topk, key_mask)
    elif isinstance(encoder_states, Fp8States):  # fp8 tensor-core matmuls; "compiled" fuses the passes between
        mixed = attend_fp8(q, encoder_states, key_mask, fused=kernel == "compiled")
    elif isinstance(encoder_states, QuantizedStates):
        mixed = attend(q, encoder_states.data, key_mask, kernel=kernel, state_scale=encoder_states.scale)
    else:
        mixed = attend(q, encoder_states.to(block.k_proj.weight.dtype), key_mask, kernel=kernel)
    out = absorbed_output(block, weights, mixed, hidden_states.shape[1])
    if key_mask is None:
        return out
    return out * key_mask.any(dim=-1)[:, None, None].to(out.dtype)


# ---------------------------------------------------------------------- the `absorbed` kv_policy
def absorbed_row_limit(block: CrossAttention) -> float:
    """Query rows per context up to which attending over the states costs fewer FLOPs than
    projecting this context's keys/values once and attending over them.

    Per context token and layer, with R query rows: absorbed costs 4 Hq R He (scores and mix over
    He-wide states); projecting costs 4 He Hkv d, then 4 Hq R d to attend. Absorbed is cheaper while
    R < He Hkv d / (Hq (He - d)): 36.6 rows at LLaMA-2-7B shapes (He 1024, Hkv 8, d 128, Hq 32), so
    decoding steps and beams read the states and a long prompt's prefill projects. An encoder no
    wider than one head (He <= d) makes absorbed cheaper at any R."""
    he, d = block.k_proj.in_features, block.head_dim
    if he <= d:
        return math.inf
    return he * block.num_kv_heads * d / (block.num_heads * (he - d))


class AbsorbedWeightsCache:
    """`absorb(block)` per cross-attention layer, computed once and held while the block's weights
    stay the same: each entry is keyed by the weights' storage, version counter (bumped by every
    in-place update: an optimizer step, `load_adapter_weights`), dtype and device, so changed or
    moved adapter weights are absorbed afresh. Owned by the model, handed to `absorbed_delta`."""

    def __init__(self) -> None:
        self._held: dict[int, tuple[tuple, AbsorbedWeights]] = {}

    def get(self, layer: int, block: CrossAttention) -> AbsorbedWeights:
        key = _weights_key(block)
        held = self._held.get(layer)
        if held is not None and held[0] == key:
            return held[1]
        weights = absorb(block)
        if key is not None:  # weights without a version counter (inference tensors) are absorbed per call
            self._held[layer] = (key, weights)
        return weights

    def nbytes(self) -> int:
        """Bytes of the held absorbed weights (those sharing the block's own storage included)."""
        tensors = [t for _, w in self._held.values() for t in (w.key, w.value, w.query_key, w.value_out)]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def clear(self) -> None:
        self._held.clear()


def _weights_key(block: CrossAttention) -> tuple | None:
    params = (block.q_proj.weight, block.k_proj.weight, block.v_proj.weight, block.o_proj.weight)
    try:
        return (block.scaling,) + tuple((p.data_ptr(), p._version, p.dtype, p.device, p.shape) for p in params)
    except RuntimeError:  # "inference tensors do not track version counter"
        return None


def absorbed_delta(block: CrossAttention, hidden_states: torch.Tensor, context: ContextStates,
                   key_mask: torch.Tensor | None, logit_scale: torch.Tensor | None,
                   weights: AbsorbedWeights, states: str = "native",
                   topk: int | None = None) -> torch.Tensor | None:
    """One layer's cross-attention delta (B, T, H) read from `context`'s encoder states, or None
    when there are more query rows per context than `absorbed_row_limit` (then projecting the
    keys/values once is cheaper).

    `context` holds the states the B = P x r rows attend to: P examples, each shared by r
    consecutive rows (an expanded context's parent; r = 1 otherwise). Cross-attention has no order
    over queries, so each example's r x T queries attend as one block of rows, and the states are
    never repeated. key_mask (P, S) and logit_scale (P,) are `context`'s own. states: the config's
    `absorbed_states` ("native", "fp8", "fp8-compiled"); fp8 states are packed once per context.
    topk: each row reads its k best states only (`cross_attn_topk`; states as held, no fp8 packing)."""
    b, t, width = hidden_states.shape
    p = context.batch_size
    rows = (b // p) * t
    if rows > absorbed_row_limit(block):
        return None
    # "auto": the Triton kernel on CUDA (one read of the states: 0.91 ms a layer at 1M tokens on the
    # H200 against 1.51 ms for two matmuls, docs/benchmarks.md run 13), the two matmuls elsewhere
    kernel = "compiled" if states == "fp8-compiled" else "auto"
    native = states == "native" or topk is not None
    held = context.hidden_states if native else context.cross_cache.fp8_states(context.hidden_states)
    out = absorbed_cross_attention(block, hidden_states.reshape(p, rows, width), held,
                                   key_mask, logit_scale, weights=weights, kernel=kernel, topk=topk)
    return out.view(b, t, width)


# ---------------------------------------------------------------------- attention over states
def attend(q: torch.Tensor, states: torch.Tensor, key_mask: torch.Tensor | None = None, kernel: str = "auto",
           chunk: int = 16384, state_scale: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q states^T) states per row: q (B, R, He) pre-scaled, states (B, S, He), key_mask
    (B, S) bool or None. Returns (B, R, He) in q's dtype; rows with no real key give zeros.
    state_scale (B, S, 1): `states` are 8-bit data, one scale per token.

    kernel "auto": the Triton kernel on CUDA when Triton imports, else the two matmuls."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "auto":
        kernel = "triton" if q.is_cuda and _triton_available() else "matmul"
    if kernel == "triton":
        from ..kernels.absorbed_decode import attend_states

        return attend_states(q, states, key_mask, state_scale=state_scale)
    if state_scale is not None:
        states = (states.float() * state_scale.view(*states.shape[:2], 1)).to(q.dtype)
    if kernel == "chunked":
        return attend_chunked(q, states, key_mask, chunk)
    return attend_matmul(q, states, key_mask)


def _scores(q: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """(B, R, S) float32 logits. On CUDA the bf16 matmul accumulates and writes float32 directly;
    elsewhere the inputs are upcast (rounding the logits to bf16 would cost ~1% of each probability)."""
    if q.is_cuda and q.dtype != torch.float32:
        try:
            return torch.bmm(q, states.transpose(1, 2), out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # torch without bmm(out_dtype=)
            pass
    return torch.bmm(q.float(), states.float().transpose(1, 2))


def attend_matmul(q: torch.Tensor, states: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Two plain matmuls and a softmax between them (the baseline): the states are read twice."""
    scores = _scores(q, states)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    if key_mask is not None:  # a row with no real key: softmax over nothing is NaN; its delta is zero
        p = torch.nan_to_num(p, nan=0.0)
    return torch.bmm(p.to(states.dtype), states).to(q.dtype)


def attend_topk(q: torch.Tensor, states: torch.Tensor, k: int, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's softmax over its k highest-scoring states only (top-k cross-attention, as
    `cross_attention.topk_attention` computes it from projected keys). q (B, R, He) pre-scaled,
    states (B, S, He). Decoding has a few rows, so the (B, R, S) float32 scores are small next to
    the states (9 heads x 1M tokens: 36 MB). Returns (B, R, He) in q's dtype."""
    b, s, he = states.shape
    scores = _scores(q, states)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, :], float("-inf"))
    top, index = scores.topk(min(k, s), dim=-1)  # (B, R, k)
    p = torch.softmax(top, dim=-1)
    if key_mask is not None:  # a row with no real key: its delta is zero (attend_matmul)
        p = torch.nan_to_num(p, nan=0.0)
    picked = states.reshape(b * s, he)[index + (torch.arange(b, device=q.device) * s).view(b, 1, 1)]
    return torch.matmul(p.to(states.dtype).unsqueeze(-2), picked).squeeze(-2).to(q.dtype)


def attend_chunked(q: torch.Tensor, states: torch.Tensor, key_mask: torch.Tensor | None = None,
                   chunk: int = 16384) -> torch.Tensor:
    """The same result chunk by chunk with an online softmax: float32 running max, normaliser and
    sum, so memory is O(R x chunk) whatever the context length. No host synchronisation."""
    b, r, he = q.shape
    m = torch.full((b, r, 1), float("-inf"), device=q.device)
    l = torch.zeros(b, r, 1, device=q.device)
    acc = torch.zeros(b, r, he, device=q.device)
    for s0 in range(0, states.shape[1], chunk):
        part = states[:, s0:s0 + chunk]
        scores = _scores(q, part)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, s0:s0 + chunk], float("-inf"))
        m_new = torch.maximum(m, scores.amax(dim=-1, keepdim=True))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # all masked so far
        p = torch.exp(scores - m_safe)
        alpha = torch.exp(m - m_safe)
        l = l * alpha + p.sum(dim=-1, keepdim=True)
        acc = acc * alpha + torch.bmm(p.to(states.dtype), part).float()
        m = m_new
    return torch.where(l > 0, acc / l.clamp_min(1e-30), torch.zeros_like(acc)).to(q.dtype)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
