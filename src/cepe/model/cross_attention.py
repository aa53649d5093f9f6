"""The cross-attention block CEPE inserts into a decoder layer."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass(frozen=True)
class ContextBias:
    """A context's padding and length scaling in the forms the attention consumes. Built once per
    context (`CrossAttentionCache.bias`), so a decoding step spends no operator on them in any layer.

    key_bias (B, 1, 1, S): 0 at real keys, -inf at padding (what SDPA makes of a bool mask); a row
        with no real key is 0 everywhere (softmax over nothing would be NaN: it attends anywhere and
        `row_gate` zeroes it); None when no key is padding (SDPA may then take its fused flash kernel).
    row_gate (B, 1, 1): 1 for rows with a real key, 0 for rows without; None when known to be all 1.
    query_scale (B, 1, 1, 1): the per-row length-scaling factor on the queries; None for 1.
    """

    key_bias: torch.Tensor | None = None
    row_gate: torch.Tensor | None = None
    query_scale: torch.Tensor | None = None

    @classmethod
    def build(cls, key_mask: torch.Tensor | None, logit_scale: torch.Tensor | None, dtype: torch.dtype,
              every_row_has_keys: bool = False) -> ContextBias:
        """key_mask (B, S) bool (True = real token) or None; logit_scale (B,) or None; tensors in
        `dtype`. every_row_has_keys: known (read once per context) to hold, so no gate is needed."""
        query_scale = None if logit_scale is None else logit_scale.to(dtype).view(-1, 1, 1, 1)
        if key_mask is None:
            return cls(query_scale=query_scale)
        has_context = key_mask.any(dim=-1)  # (B,)
        attend = key_mask | ~has_context[:, None]
        key_bias = torch.zeros(attend.shape, dtype=dtype, device=attend.device).masked_fill_(~attend, float("-inf"))
        row_gate = None if every_row_has_keys else has_context.to(dtype).view(-1, 1, 1)
        return cls(key_bias[:, None, None, :], row_gate, query_scale)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.key_bias, self.row_gate, self.query_scale) if t is not None]


class CrossAttention(nn.Module):
    """Pre-norm cross-attention from decoder tokens to encoded context tokens.

    No rotary positions (context chunks have no order relative to the decoder), grouped-query
    keys/values, padding masked. Returns the residual *delta*; the caller adds it.

    Args:
        hidden_size: decoder width H.
        encoder_hidden_size: encoder width He (keys/values are projected from it).
        num_heads, num_kv_heads, head_dim: query heads, key/value heads, head width d.
        norm: a norm module of the decoder's own type (deep-copied), applied to the queries' input.
        scaling: softmax scale (the decoder's, e.g. d**-0.5).
    """

    def __init__(
        self,
        hidden_size: int,
        encoder_hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        norm: nn.Module,
        scaling: float | None = None,
    ):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scaling = scaling if scaling is not None else head_dim**-0.5
        self.norm = norm
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(encoder_hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(encoder_hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def project_kv(self, encoder_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, He) encoder states -> keys, values, each (B, Hkv, S, d)."""
        b, s, _ = encoder_states.shape
        x = encoder_states.to(self.k_proj.weight.dtype)
        # contiguous once here: a decoding step reads these S keys at every call, and batched
        # matmuls over the transposed view copy them each time (30x slower at B = 4 on a CPU)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2).contiguous()
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2).contiguous()
        return k, v

    def forward(
        self,
        hidden_states: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        logit_scale: torch.Tensor | None = None,
        *,
        bias: ContextBias | None = None,
        topk: int | None = None,
    ) -> torch.Tensor:
        """hidden_states (B, T, H); key/value (B, Hkv, S, d); key_mask (B, S) bool, True = real token,
        or None when no key is padding (SDPA can then take its fused flash kernel); logit_scale
        (B,): per-row factor on the attention logits (length scaling), None for 1. `bias`: the two
        already in the attention's forms (`ContextBias`, built once per context), used instead.
        topk: each query attends to its `topk` highest-scoring keys only (`topk_attention`); None
        (or a context of at most `topk` keys) for full attention.

        Returns the delta (B, T, H) to add to the residual stream. Rows whose context is entirely
        padding get a zero delta (as if they had no context)."""
        if bias is None:
            bias = ContextBias.build(key_mask, logit_scale, self.q_proj.weight.dtype)
        b, t, _ = hidden_states.shape
        kv_heads = key.shape[1]
        group = self.num_heads // kv_heads
        q = self.q_proj(self.norm(hidden_states)).view(b, t, kv_heads, group, self.head_dim)
        # grouped-query without copying keys/values: cross-attention has no causal order, so the
        # `group` query heads that share a key/value head are stacked along the query axis
        q = q.permute(0, 2, 3, 1, 4).reshape(b, kv_heads, group * t, self.head_dim)
        if bias.query_scale is not None:  # scaling the queries scales q.k and leaves the kernel choice alone
            q = q * _in(bias.query_scale, q.dtype)
        mask = None if bias.key_bias is None else _in(bias.key_bias, q.dtype)
        if topk is not None and key.shape[-2] > topk:
            out = topk_attention(q, key, value, mask, self.scaling, topk)
        else:
            with decode_kernels() if q.is_cuda and q.shape[-2] <= 64 else contextlib.nullcontext():
                out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=self.scaling)
        out = out.view(b, kv_heads, group, t, self.head_dim).permute(0, 3, 1, 2, 4).reshape(b, t, -1)
        out = self.o_proj(out)
        return out if bias.row_gate is None else out * _in(bias.row_gate, out.dtype)

    @classmethod
    def from_self_attention(
        cls,
        layer: nn.Module,
        query_norm: nn.Module,
        encoder_hidden_size: int,
        num_kv_heads: int | None,
        init: str,
    ) -> CrossAttention:
        """Build a block for one decoder layer, initialised from that layer's self-attention.

        `copy`: query, output and norm copied; key/value from the self-attention's key/value,
        heads averaged (or repeated) to `num_kv_heads` and input columns sliced to the encoder width
        (tiled when the encoder is wider). `zero`: the same, then the output projection zeroed, so
        the block adds exactly nothing until trained."""
        attn = layer.self_attn
        w_q, w_k, w_v, w_o = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight
        head_dim = getattr(attn, "head_dim", None) or w_q.shape[0] // layer_heads(attn, w_q)
        num_heads = w_q.shape[0] // head_dim
        src_kv = w_k.shape[0] // head_dim
        num_kv_heads = num_kv_heads or src_kv
        block = cls(
            hidden_size=w_q.shape[1],
            encoder_hidden_size=encoder_hidden_size,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            norm=copy.deepcopy(query_norm),
            scaling=getattr(attn, "scaling", None),
        ).to(device=w_q.device, dtype=w_q.dtype)
        with torch.no_grad():
            block.q_proj.weight.copy_(w_q)
            block.o_proj.weight.copy_(w_o)
            block.k_proj.weight.copy_(_kv_init(w_k, head_dim, num_kv_heads, encoder_hidden_size))
            block.v_proj.weight.copy_(_kv_init(w_v, head_dim, num_kv_heads, encoder_hidden_size))
            if init == "zero":
                block.o_proj.weight.zero_()
        for p in block.parameters():
            p.requires_grad_(True)
        return block


def topk_attention(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_bias: torch.Tensor | None,
                   scale: float, k: int, max_scores: int = 2**26) -> torch.Tensor:
    """Attention in which each query row reads only its k highest-scoring keys.

    Softmax over all S keys gives every key some weight, so a fact that one chunk holds competes
    with S - 1 others and fades as the context grows; among its row's top k it keeps the weight it
    had in a short context (the sparse attention of Unlimiformer and Memorizing Transformers).

    q (B, H, R, d); key/value (B, H, S, d); key_bias (B, 1, 1, S) additive (-inf at padding) or
    None. Returns (B, H, R, d) in q's dtype. Scores are float32, in blocks of query rows of at most
    `max_scores` scores, so a million keys never need a (R, S) matrix at once.

    The keys are chosen without autograd; when gradients are needed, the k scores are recomputed
    from the gathered keys, so the backward pass touches (R, k) scores instead of scattering into a
    dense (R, S) gradient and multiplying it back through all S keys (2-3x faster in training)."""
    b, h, s, d = key.shape
    rows = q.shape[-2]
    block = max(1, min(rows, max_scores // max(1, b * h * s)))
    grad = torch.is_grad_enabled() and (q.requires_grad or key.requires_grad)
    bias = None if key_bias is None else key_bias.float() / scale  # in score units, once per call
    out = []
    for start in range(0, rows, block):
        q_block = q[:, :, start:start + block]
        r = q_block.shape[-2]
        with torch.no_grad():
            # scale > 0 ranks q.k + bias/scale as scale * q.k + bias: one (r, S) pass fewer
            scores = torch.matmul(q_block, key.transpose(-1, -2)).float()
            if bias is not None:
                scores += bias
            top, index = scores.topk(k, dim=-1)  # (B, H, r, k)
        # gathered along S from the keys as they are: flattening them to index would copy every
        # key and value of the context whenever they are not contiguous
        rows_index = index.reshape(b, h, r * k, 1).expand(-1, -1, -1, d)
        if grad:
            picked_keys = key.gather(2, rows_index).view(b, h, r, k, d)
            top = torch.matmul(q_block.unsqueeze(-2), picked_keys.transpose(-1, -2)).squeeze(-2).float()
            if bias is not None:
                top = top + bias.expand(b, h, r, s).gather(-1, index)
        weights = (top * scale).softmax(dim=-1).to(value.dtype)
        picked_values = value.gather(2, rows_index).view(b, h, r, k, d)
        out.append(torch.matmul(weights.unsqueeze(-2), picked_values).squeeze(-2))  # (B, H, r, d)
    return torch.cat(out, dim=-2).to(q.dtype)


def _in(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype`; no operator when it already is (the usual case: built in the weights' dtype)."""
    return t if t.dtype == dtype else t.to(dtype)


def decode_kernels():
    """SDPA kernel order for a few queries against many keys (a decoding step): FlashAttention
    first, which splits the keys across the whole chip. PyTorch 2.11's own pick on an H100 (cuDNN)
    reads them about 7x slower there (docs/bench/NOTES.md); long query blocks keep PyTorch's choice."""
    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch < 2.6: no priority order; leave cuDNN out instead
        return sdpa_kernel(order[:2] + order[3:])


def layer_heads(attn: nn.Module, w_q: torch.Tensor) -> int:
    cfg = getattr(attn, "config", None)
    return getattr(cfg, "num_attention_heads", None) or attn.num_heads


def _kv_init(w: torch.Tensor, head_dim: int, num_kv_heads: int, in_features: int) -> torch.Tensor:
    """Self-attention key/value weight (Hkv_src*d, H) -> cross-attention weight (num_kv_heads*d, in_features)."""
    src_heads, hidden = w.shape[0] // head_dim, w.shape[1]
    heads = w.view(src_heads, head_dim, hidden).float()
    if num_kv_heads <= src_heads and src_heads % num_kv_heads == 0:
        # grouped-query: average consecutive heads, matching how queries are grouped
        heads = heads.view(num_kv_heads, src_heads // num_kv_heads, head_dim, hidden).mean(dim=1)
    else:
        heads = heads[torch.arange(num_kv_heads) % src_heads]
    w = heads.reshape(num_kv_heads * head_dim, hidden)
    if in_features <= hidden:
        w = w[:, :in_features]
    else:
        w = w.repeat(1, -(-in_features // hidden))[:, :in_features] * (hidden / in_features) ** 0.5
    return w.to(dtype=heads.dtype)
