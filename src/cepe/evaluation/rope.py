"""RoPE scaling (linear, dynamic NTK, YaRN) for a loaded decoder, through the transformers rope config.

The decoder's weights are untouched: we build a second rotary-embedding module of the decoder's
own class from a copy of its config with `rope_parameters` set (transformers 5.x; `rope_scaling`
on configs that predate it), and swap it in for the duration of a call.
"""

from __future__ import annotations

import contextlib
import copy

from torch import nn

ROPE_TYPES = ("linear", "dynamic", "yarn")


def native_window(decoder: nn.Module) -> int:
    """Positions the decoder was trained on."""
    cfg = decoder.config
    params = rope_parameters(cfg) or {}
    return int(params.get("original_max_position_embeddings") or cfg.max_position_embeddings)


def rope_parameters(config) -> dict | None:
    if hasattr(config, "rope_parameters"):
        return config.rope_parameters
    return getattr(config, "rope_scaling", None)  # configs from before transformers 5


def _rotary_owner(decoder: nn.Module) -> nn.Module:
    inner = decoder.get_decoder() if hasattr(decoder, "get_decoder") else decoder.model
    if not isinstance(getattr(inner, "rotary_emb", None), nn.Module):
        raise ValueError(f"{type(decoder).__name__}: no `rotary_emb` module, RoPE scaling is not supported for it")
    return inner


def scaled_config(config, rope_type: str, factor: float):
    """A copy of `config` whose RoPE is scaled by `factor` with `rope_type`."""
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope scaling must be one of {ROPE_TYPES}, got {rope_type!r}")
    if factor < 1:
        raise ValueError(f"rope scaling factor must be >= 1, got {factor}")
    cfg = copy.deepcopy(config)
    base = dict(rope_parameters(cfg) or {})
    if any(isinstance(v, dict) for v in base.values()):
        raise ValueError("per-layer-type RoPE parameters (e.g. Gemma 3) are not supported for RoPE scaling")
    theta = base.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    native = int(base.get("original_max_position_embeddings") or cfg.max_position_embeddings)
    params = {"rope_type": rope_type, "rope_theta": theta, "factor": float(factor)}
    if "partial_rotary_factor" in base:
        params["partial_rotary_factor"] = base["partial_rotary_factor"]
    if rope_type == "yarn":
        # YaRN reads the pre-extension window here and checks factor == max_positions / original
        params["original_max_position_embeddings"] = native
        cfg.max_position_embeddings = int(native * factor)
    if hasattr(cfg, "rope_parameters"):
        cfg.rope_parameters = params
    else:
        cfg.rope_scaling = params
    return cfg


@contextlib.contextmanager
def scaled_rope(decoder: nn.Module, rope_type: str | None, factor: float = 1.0):
    """Run `decoder` with scaled RoPE inside the block (`rope_type=None`: unchanged)."""
    if rope_type is None:
        yield decoder
        return
    owner = _rotary_owner(decoder)
    original = owner.rotary_emb
    ref = next(original.buffers(), None)
    rotary = type(original)(config=scaled_config(decoder.config, rope_type, factor))
    if ref is not None:
        rotary.to(ref.device)
    owner.rotary_emb = rotary
    try:
        yield decoder
    finally:
        owner.rotary_emb = original
