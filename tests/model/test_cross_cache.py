"""The typed cross-attention cache: what each policy fills, its byte count, shared-context reuse."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_cepe

from cepe import ContextStates
from cepe.model.cross_cache import CrossAttentionCache


def _encoded(m, b=1, n=3, length=10):
    g = torch.Generator().manual_seed(1)
    return m.encode(torch.randint(3, 60, (b, n, length), generator=g))


@pytest.mark.parametrize("policy", ["recompute", "cache", "auto"])
def test_policy_decides_what_the_cache_keeps(policy):
    m = tiny_cepe("llama", "bert")
    m.config.kv_policy = policy
    ctx = _encoded(m)
    with torch.no_grad():
        m(torch.tensor([[5, 6, 7]]), context=ctx)
    cache = ctx.cross_cache
    if policy == "recompute":
        assert not cache.filled and cache.policy is None and cache.nbytes() == 0
        return
    assert cache.layers == m.config.selected_layers() and cache.policy == "cache"  # auto records its choice
    assert cache.nbytes() == m.cross_kv_cache_bytes(ctx)
    assert ctx.nbytes() == cache.nbytes() + ctx.hidden_states.numel() * 4 + ctx.attention_mask.numel()
    k, v = cache.keys_values(0)
    assert k.shape == v.shape == (1, 2, 30, 8)


def test_shared_context_is_projected_once_on_the_parent():
    m = tiny_cepe("llama", "bert")
    m.config.kv_policy = "cache"
    ctx = _encoded(m)
    with torch.no_grad():
        m(torch.tensor([[5, 6, 7]] * 3), context=ctx)
    wide = ctx.expanded(3)
    assert wide.parent is ctx and ctx.expanded(3) is wide  # kept for the next decoding step
    pk, _ = ctx.cross_cache.keys_values(0)
    k, _ = wide.cross_cache.keys_values(0)
    assert pk.shape[0] == 1 and torch.equal(k, pk.repeat_interleave(3, dim=0))
    assert ctx.cross_cache.nbytes() == m.cross_kv_cache_bytes(ctx) + wide.nbytes()


def test_key_mask_and_logit_scale_are_decided_once():
    cache = CrossAttentionCache()
    full = torch.ones(2, 6, dtype=torch.bool)
    assert cache.key_mask(full) is None
    assert cache.key_mask(torch.zeros(2, 6, dtype=torch.bool)) is None  # decided: the context does not change
    padded = torch.tensor([[True] * 6, [True] * 2 + [False] * 4])
    assert CrossAttentionCache().key_mask(padded) is padded
    assert cache.logit_scale(padded, 8) is None  # no row longer than L = 8
    scale = cache.logit_scale(padded, 4)  # keyed by L: another L is computed afresh
    torch.testing.assert_close(scale, torch.tensor([torch.log(torch.tensor(4.0)) / torch.log(torch.tensor(6.0)), 1.0]))


def test_a_moved_or_fresh_context_starts_with_an_empty_cache():
    m = tiny_cepe("llama", "bert")
    m.config.kv_policy = "cache"
    ctx = _encoded(m)
    with torch.no_grad():
        m(torch.tensor([[5, 6, 7]]), context=ctx)
    assert ctx.cross_cache.filled
    assert not ctx.to("cpu").cross_cache.filled
    assert not ContextStates(ctx.hidden_states, ctx.attention_mask, ctx.encoder_hash).cross_cache.filled
