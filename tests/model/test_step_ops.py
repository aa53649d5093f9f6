"""Operators per decoding step in the cross-attention (each a kernel launch on a GPU, where a small
model's step is bound by launches, not compute: docs/serving.md, "Per-step overhead")."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_cepe
from torch.utils._python_dispatch import TorchDispatchMode

from cepe.model import decoding
from cepe.model.cross_cache import CrossAttentionCache

# rms norm (6), q and o projections, attention, the two residual adds of the layer hooks
KERNELS_PER_LAYER = 11


class _Kernels(TorchDispatchMode):
    """Counts dispatched aten operators that are not views (what launches a kernel on a GPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not (func.is_view or func is torch.ops.aten._unsafe_view.default)
        return func(*args, **(kwargs or {}))


def _padded_context(m, rows_without_context=()):
    """Two rows of 3 chunks of 8 with padding in every row's last chunk."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 60, (2, 3, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[:, -1, 5:] = 0
    for row in rows_without_context:
        mask[row] = 0
    return m.encode(ids, mask)


@torch.no_grad()
def _step_kernels(m, **kwargs) -> int:
    batch = decoding.Batch(m, pad_id=0, **kwargs)
    tokens = batch.prefill([[5, 6, 7], [8, 9, 10]]).argmax(-1)
    tokens = batch.step(tokens).argmax(-1)  # first step: per-context state built here
    with _Kernels() as counter:
        batch.step(tokens)
    return counter.count


@pytest.mark.parametrize("case, extra", [("padding", 0), ("length scaling", 1), ("a row without context", 1)])
def test_cross_attention_kernels_per_decoding_step(case, extra):
    """A cached-keys decoding step pays nothing per layer for the context's mask, row gate or
    length scaling: they are built once per context (`ContextBias`), not in every layer and step."""
    m = tiny_cepe("llama", "bert", kv_policy="cache")
    if case == "length scaling":
        m.config.cross_attn_length_scaling = 4
    ctx = _padded_context(m, rows_without_context=[1] if case == "a row without context" else [])
    assert ctx.cross_cache.key_mask(ctx.attention_mask) is not None  # the mask is really there
    bare = _step_kernels(m)
    with_context = _step_kernels(m, context=ctx)
    per_layer = (with_context - bare) / len(m.cross_attn)
    assert per_layer <= KERNELS_PER_LAYER + extra, f"{per_layer} kernels per cross-attention layer ({case})"
    bias = ctx.cross_cache.bias(ctx.attention_mask, m.config.cross_attn_length_scaling, torch.float32)
    assert (bias.row_gate is not None) == (case == "a row without context")
    assert (bias.query_scale is not None) == (case == "length scaling")


def test_context_bias_gives_the_masked_attention():
    """The additive bias, row gate and query scale, built once per context, give plain masked
    grouped-query attention with the logits scaled per row; a row with no real key gets zero."""
    m = tiny_cepe("llama", "bert")
    block = m.cross_attn["1"]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 2, 32, generator=g)
    k, v = block.project_kv(torch.randn(3, 7, 24, generator=g))
    key_mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4, [False] * 7])
    cache = CrossAttentionCache()
    with torch.no_grad():
        bias = cache.bias(key_mask, 4, torch.float32)
        got = block(h, k, v, bias=bias)
        assert torch.equal(got, block(h, k, v, key_mask, cache.logit_scale(key_mask, 4)))
        q = block.q_proj(block.norm(h)).view(3, 2, 4, 8).transpose(1, 2)  # (B, Hq, T, d)
        scale = torch.log(torch.tensor(4.0)) / torch.log(torch.tensor(7.0))
        row_scale = torch.tensor([scale, 1, 1]).view(3, 1, 1, 1)
        logits = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * block.scaling * row_scale
        p = logits.masked_fill(~key_mask[:, None, None, :], float("-inf")).softmax(-1).nan_to_num(0.0)
        expect = block.o_proj((p @ v.repeat_interleave(2, dim=1)).transpose(1, 2).reshape(3, 2, 32))
    torch.testing.assert_close(got, expect)
    assert got[2].abs().max() == 0 and bias.row_gate.flatten().tolist() == [1.0, 1.0, 0.0]
    assert cache.bias(key_mask, 4, torch.float32) is bias  # once per context
    assert cache.nbytes() == sum(t.numel() * t.element_size() for t in bias.tensors()) + 3 * 4  # + the logit scale
