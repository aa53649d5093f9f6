"""What a stored document costs per context token, and 8-bit formats for its encoder states.

Decoding with absorbed projections (`cepe.model.absorbed`) needs only the encoder states: He values
per context token, shared by every cross-attention layer. The `cache` policy keeps 2 x Hkv x d
values per token in every layer instead, and full attention 2 x kv heads x d per decoder layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .cross_attention import CrossAttention

STATE_FORMATS = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "fp8": 1}
SCALE_BYTES = 4  # one float32 scale per token for the 8-bit formats


def state_bytes_per_token(encoder_hidden_size: int, fmt: str = "bfloat16") -> int:
    """Bytes one context token's encoder states take in `fmt` (8-bit formats: plus its scale)."""
    if fmt not in STATE_FORMATS:
        raise ValueError(f"state format must be one of {sorted(STATE_FORMATS)}, got {fmt!r}")
    return encoder_hidden_size * STATE_FORMATS[fmt] + (SCALE_BYTES if STATE_FORMATS[fmt] == 1 else 0)


def cross_kv_bytes_per_token(blocks: Iterable[CrossAttention], dtype_bytes: int = 2) -> int:
    """Bytes the `cache` policy holds per context token: keys and values of every block."""
    return sum(2 * blk.num_kv_heads * blk.head_dim * dtype_bytes for blk in blocks)


def full_attention_kv_bytes_per_token(decoder_config, dtype_bytes: int = 2) -> int:
    """Bytes a decoder's own KV cache holds per token (full attention over the same text)."""
    c = getattr(decoder_config, "text_config", decoder_config)
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * kv * head_dim * dtype_bytes


def storage_per_token(blocks: Iterable[CrossAttention], fmt: str = "bfloat16", kv_dtype_bytes: int = 2,
                      decoder_config=None) -> dict:
    """Per context token: stored states in `fmt`, the `cache` policy's keys/values, and (given the
    decoder's config) full attention's KV cache, with the ratios the issue quotes.

    LLaMA-2-7B shapes (He 1,024; 32 layers x 8 kv heads x 128; 32 x 32 x 128 decoder): states 2,048 B
    in bf16, cross keys/values 131,072 B (64x), full attention 524,288 B (256x)."""
    blocks = list(blocks)
    he = blocks[0].k_proj.in_features
    out = {"format": fmt, "states": state_bytes_per_token(he, fmt),
           "cross_kv_cache": cross_kv_bytes_per_token(blocks, kv_dtype_bytes)}
    out["cache_over_states"] = out["cross_kv_cache"] / out["states"]
    if decoder_config is not None:
        out["full_attention_kv"] = full_attention_kv_bytes_per_token(decoder_config, kv_dtype_bytes)
        out["full_over_states"] = out["full_attention_kv"] / out["states"]
    return out


# ---------------------------------------------------------------------- 8-bit states
@dataclass
class QuantizedStates:
    """Encoder states in 8 bits with one scale per token: data (B, S, He) int8 or float8_e4m3fn,
    scale (B, S, 1) float32; states ~= data * scale, restored in `dtype`."""

    data: torch.Tensor
    scale: torch.Tensor
    fmt: str
    dtype: torch.dtype

    def dequantize(self) -> torch.Tensor:
        return (self.data.float() * self.scale).to(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()


_MAX = {"int8": 127.0, "fp8": 448.0}  # largest finite value of each format (fp8: e4m3fn)


def quantize_states(states: torch.Tensor, fmt: str = "int8") -> QuantizedStates:
    """Per-token symmetric quantization: each token's largest |value| maps to the format's largest
    value. Per token because encoder states vary in scale from token to token (a chunk's first
    token often carries much larger activations) while a token's own channels share one range."""
    if fmt not in _MAX:
        raise ValueError(f"fmt must be 'int8' or 'fp8', got {fmt!r}")
    x = states.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / _MAX[fmt]
    y = x / scale
    data = y.round().clamp(-127, 127).to(torch.int8) if fmt == "int8" else y.to(torch.float8_e4m3fn)
    return QuantizedStates(data, scale, fmt, states.dtype)
