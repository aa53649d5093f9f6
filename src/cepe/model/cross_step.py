"""One cross-attention step inside a decoder layer: where its keys/values come from.

`CepeForCausalLM` installs `cross_attention_delta` (through its `_cross_delta`) on every selected
layer. The keys/values of a context are either read from its `CrossCache`, projected from the
encoder states now (and kept or not, per the context's `kv_policy`), or skipped altogether by the
absorbed path, which folds the key/value projections into the query and output sides."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .absorbed import AbsorbedWeightsCache, absorbed_delta
from .configuration import CepeConfig
from .context import ContextStates
from .cross_attention import CrossAttention
from .stored_states import cross_kv_bytes_per_token


def cross_kv_cache_bytes(blocks: list[CrossAttention], ctx: ContextStates) -> int:
    """Memory the `cache` policy would hold for this context: 2 x layers x B x Hkv x S x d."""
    b, s, _ = ctx.hidden_states.shape
    return b * s * cross_kv_bytes_per_token(blocks, blocks[0].q_proj.weight.element_size())


def resolve_kv_policy(config: CepeConfig, blocks: list[CrossAttention], ctx: ContextStates, training: bool) -> str:
    """The policy a forward follows: `auto` resolved (cache when this context's keys/values,
    `cross_kv_cache_bytes`, fit `kv_cache_budget_bytes`, else absorbed); `recompute` in training,
    and for `absorbed` whenever grad is enabled (absorbed weights are computed without grad: K/V
    would get none)."""
    policy = config.kv_policy
    if policy == "auto":
        policy = "cache" if cross_kv_cache_bytes(blocks, ctx) <= config.kv_cache_budget_bytes else "absorbed"
    if torch.is_grad_enabled() and (training or policy == "absorbed"):
        return "recompute"
    return policy


def logit_scale(config: CepeConfig, ctx: ContextStates) -> torch.Tensor | None:
    """(B,) log(L) / log(n) for rows with n > L real context tokens (1 elsewhere), or None when
    length scaling is off (or top-k attention is on) or no row is longer than L (decided once per
    context)."""
    trained = config.applied_length_scaling
    return None if trained is None else ctx.cross_cache.logit_scale(ctx.attention_mask, trained)


def cross_attention_delta(block: CrossAttention, idx: int, h: torch.Tensor, ctx: ContextStates, *,
                          config: CepeConfig, policy: Callable[[], str],
                          absorbed_weights: AbsorbedWeightsCache) -> torch.Tensor:
    """Layer `idx`'s cross-attention output for residual stream h (B, T, H) over `ctx`
    (hidden_states (B, S, He)): (B, T, H), added to h before the layer's MLP. `policy()` gives the
    resolved policy (`resolve_kv_policy`); it is called only when the context holds no keys/values
    yet, so cached decoding steps skip it."""
    kv = ctx.cross_cache.keys_values(idx)
    if kv is None:
        policy = policy()
        parent = ctx.parent
        # decode from the encoder states; K/V only for many query rows, not kept
        if policy == "absorbed":
            src = parent if parent is not None else ctx
            ctx.cross_cache.policy = src.cross_cache.policy = "absorbed"
            delta = absorbed_delta(block, h, src, src.cross_cache.key_mask(src.attention_mask),
                                   logit_scale(config, src), absorbed_weights.get(idx, block),
                                   config.absorbed_states, topk=config.cross_attn_topk)
            if delta is not None:
                return delta
        keep = policy == "cache"
        if parent is not None:
            # an expanded context (beams, label candidates, one document shared by many prompts):
            # project the parent's states once and repeat the keys/values, instead of projecting
            # B copies (under every policy; `cache` also keeps them for the next steps)
            pkv = parent.cross_cache.keys_values(idx) or block.project_kv(parent.hidden_states)
            if keep:
                parent.cross_cache.store(idx, *pkv, policy=policy)
            r = ctx.batch_size // parent.batch_size
            kv = tuple(t.repeat_interleave(r, dim=0) for t in pkv)
        else:
            kv = block.project_kv(ctx.hidden_states)
        if keep:
            ctx.cross_cache.store(idx, *kv, policy=policy)
    trained = config.applied_length_scaling
    return block(h, *kv, bias=ctx.cross_cache.bias(ctx.attention_mask, trained, block.q_proj.weight.dtype),
                 topk=config.cross_attn_topk)
