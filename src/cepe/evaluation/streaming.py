"""StreamingLLM (Xiao et al., 2024) in one forward pass: attention sinks + a window of recent tokens.

StreamingLLM decodes token by token with a KV cache that keeps the first `num_sinks` tokens and
the `window - num_sinks` most recent ones, and gives positions by place *in the cache*: once the
cache is full the query sits at position `window - 1` and sink s at position s. Because RoPE
scores depend only on position differences, that equals attention at the true positions, except
that a sink key must be rotated by an extra `max(0, t - window + 1)` for query t. We register an
attention function (transformers' `AttentionInterface`) that does exactly this, block by block
over the queries, so every token's hidden states are the ones streaming would have cached:
exact StreamingLLM, with O(T * window) attention and no per-token loop.

Each token t attends to sinks {0..num_sinks-1} and to the `window - num_sinks` most recent tokens
(itself included): at most `window` keys. For a sequence no longer than `window` this is the
plain causal decoder. Supports decoders with one standard (unscaled, full-width) RoPE.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from transformers import AttentionInterface

ATTN_NAME = "cepe_sink_attention"


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def make_sink_attention(num_sinks: int, window: int, inv_freq: torch.Tensor, block: int = 256):
    """An `AttentionInterface` function for StreamingLLM with re-numbered (in-cache) positions."""
    if window <= num_sinks:
        raise ValueError(f"window ({window}) must exceed the number of sinks ({num_sinks})")
    recent = window - num_sinks

    def attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
        # query (B, H, T, d); key/value (B, Hkv, T, d), rotated at the true positions 0..T-1
        b, h, t, d = query.shape
        if key.shape[2] != t:
            raise ValueError("sink attention scores a whole sequence in one pass (no KV cache)")
        if inv_freq.numel() * 2 != d:
            raise ValueError("StreamingLLM here needs RoPE over the full head width")
        rep = h // key.shape[1]
        key = key.repeat_interleave(rep, dim=1).float()
        value = value.repeat_interleave(rep, dim=1).float()
        scaling = scaling if scaling is not None else d**-0.5
        freqs = inv_freq.to(device=query.device, dtype=torch.float32)
        s = min(num_sinks, t)
        k_sink, v_sink = key[:, :, :s], value[:, :, :s]
        k_sink_half = _rotate_half(k_sink)
        out = torch.empty(b, h, t, d, dtype=torch.float32, device=query.device)
        for q0 in range(0, t, block):
            q1 = min(t, q0 + block)
            q = query[:, :, q0:q1].float()
            pos = torch.arange(q0, q1, device=query.device)
            # recent keys (never the sinks, which are handled below)
            lo = max(s, q0 - recent + 1)
            j = torch.arange(lo, q1, device=query.device)
            seen = (j[None] <= pos[:, None]) & (j[None] > pos[:, None] - recent)
            sc_recent = (q @ key[:, :, lo:q1].transpose(-1, -2)) * scaling
            sc_recent = sc_recent.masked_fill(~seen, float("-inf"))
            # sinks: rotate each sink key forward by the query's shift between true and cache position
            shift = (pos - (window - 1)).clamp(min=0).float()
            ang = shift[:, None] * freqs[None]
            ang = torch.cat((ang, ang), dim=-1)  # (bq, d), the rotate_half layout
            cos, sin = ang.cos()[None, None, :, None, :], ang.sin()[None, None, :, None, :]
            k_rot = k_sink[:, :, None] * cos + k_sink_half[:, :, None] * sin  # (B, H, bq, s, d)
            sc_sink = torch.einsum("bhqd,bhqsd->bhqs", q, k_rot) * scaling
            sink_seen = torch.arange(s, device=query.device)[None] <= pos[:, None]
            sc_sink = sc_sink.masked_fill(~sink_seen, float("-inf"))
            p = torch.softmax(torch.cat((sc_sink, sc_recent), dim=-1), dim=-1)
            out[:, :, q0:q1] = p[..., :s] @ v_sink + p[..., s:] @ value[:, :, lo:q1]
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    return attention


def _rotary(decoder: nn.Module) -> nn.Module:
    inner = decoder.get_decoder() if hasattr(decoder, "get_decoder") else decoder.model
    rotary = getattr(inner, "rotary_emb", None)
    params = getattr(decoder.config, "rope_parameters", None) or {}
    nested = any(isinstance(v, dict) for v in params.values())
    if rotary is None or nested or getattr(rotary, "inv_freq", None) is None:
        raise ValueError(f"StreamingLLM: {type(decoder).__name__} has no single standard rotary embedding")
    if params.get("rope_type", "default") != "default" or float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
        raise ValueError("StreamingLLM: only an unscaled RoPE can be re-numbered exactly")
    if getattr(decoder.config, "attn_logit_softcapping", None):
        raise ValueError("StreamingLLM: attention soft-capping is not supported")
    return rotary


@contextlib.contextmanager
def sink_attention(decoder: nn.Module, num_sinks: int, window: int, block: int = 256):
    """Inside the block, `decoder` attends like StreamingLLM (whole sequence, no cache, no padding)."""
    rotary = _rotary(decoder)
    AttentionInterface.register(ATTN_NAME, make_sink_attention(num_sinks, window, rotary.inv_freq, block))
    previous = decoder.config._attn_implementation
    decoder.set_attn_implementation(ATTN_NAME)
    try:
        yield decoder
    finally:
        decoder.set_attn_implementation(previous)
