"""Top-k cross-attention (`cross_attn_topk`): each query reads its k best keys only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_bert, tiny_cepe

from cepe import CepeConfig, CepeForCausalLM
from cepe.model import absorbed
from cepe.model.cross_attention import topk_attention


def _qkv(b=2, h=3, r=5, s=40, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g) for n in (r, s, s))


def _reference(q, k, v, bias, scale, top):
    """Dense: scores outside each row's top `top` set to -inf, then ordinary softmax attention."""
    scores = (q @ k.transpose(-1, -2)) * scale + (0 if bias is None else bias)
    kth = scores.topk(top, dim=-1).values[..., -1:]
    return torch.softmax(scores.masked_fill(scores < kth, float("-inf")), dim=-1) @ v


@pytest.mark.parametrize("top", [1, 4, 39])
def test_topk_attention_matches_dense_reference(top):
    q, k, v = _qkv()
    out = topk_attention(q, k, v, None, 0.35, top)
    torch.testing.assert_close(out, _reference(q, k, v, None, 0.35, top), rtol=1e-5, atol=1e-5)
    if top == 39:  # nearly every key: close to full attention, but not equal to it
        full = F.scaled_dot_product_attention(q, k, v, scale=0.35)
        assert (out - full).abs().max() > 1e-6


def test_topk_attention_with_every_key_is_full_attention():
    q, k, v = _qkv()
    full = F.scaled_dot_product_attention(q, k, v, scale=0.35)
    torch.testing.assert_close(topk_attention(q, k, v, None, 0.35, 40), full, rtol=1e-5, atol=1e-5)


def test_topk_attention_never_reads_padding_and_blocks_rows_exactly():
    q, k, v = _qkv(b=2, s=12)
    bias = torch.zeros(2, 1, 1, 12)
    bias[1, ..., 4:] = float("-inf")  # row 1: 4 real keys
    v = v.clone()
    v[1, :, 4:] = 1e6  # any weight on padding would show
    out = topk_attention(q, k, v, bias, 0.5, 6)  # k above row 1's real keys: its padding is in the top 6
    assert out[1].abs().max() < 1e3
    torch.testing.assert_close(out, _reference(q, k, v, bias, 0.5, 6), rtol=1e-5, atol=1e-5)
    # a bound of one row of scores at a time changes nothing
    torch.testing.assert_close(topk_attention(q, k, v, bias, 0.5, 6, max_scores=1), out, rtol=1e-6, atol=1e-6)


def test_topk_attention_reads_strided_keys_as_they_are():
    """Keys/values as a (B, S, H, d) projection transposed to (B, H, S, d), not copied: the same
    answer, rows blocked or not (they are gathered along S, never flattened)."""
    q, k, v = _qkv(b=3, s=30)
    ks, vs = k.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(1, 2).contiguous().transpose(1, 2)
    assert not ks.is_contiguous()
    ref = _reference(q, k, v, None, 0.4, 5)
    torch.testing.assert_close(topk_attention(q, ks, vs, None, 0.4, 5), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(topk_attention(q, ks, vs, None, 0.4, 5, max_scores=30), ref, rtol=1e-5, atol=1e-5)


def test_projected_keys_values_are_contiguous():
    """A decoding step reads the cached keys at every call: they are laid out once, at projection."""
    block = next(iter(tiny_cepe().cross_attn.values()))
    k, v = block.project_kv(torch.randn(2, 7, block.k_proj.in_features))
    assert k.shape == (2, block.num_kv_heads, 7, block.head_dim) and k.is_contiguous() and v.is_contiguous()


@pytest.mark.parametrize("padded", [False, True])
def test_topk_attention_gradients_match_dense_reference(padded):
    """Training recomputes the k scores from gathered keys: the same values and gradients as a
    dense masked softmax, with padding (fewer real keys than k) getting no gradient."""
    q, k, v = (t.requires_grad_() for t in _qkv(b=2, s=12))
    bias = torch.zeros(2, 1, 1, 12)
    if padded:
        bias[1, ..., 4:] = float("-inf")
    out = topk_attention(q, k, v, bias, 0.5, 6, max_scores=100)  # a few rows per block
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = _reference(q, k, v, bias, 0.5, 6)
    expected = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if padded:
        assert grads[1][1, :, 4:].abs().max() == 0 and grads[2][1, :, 4:].abs().max() == 0


def test_model_topk_setting_runs_every_block_sparse_and_policies_agree(monkeypatch):
    """cross_attn_topk >= the context length is full attention; below it the logits move, and
    `absorbed`, `cache` and `recompute` give the same top-k logits."""
    m = tiny_cepe("llama", "bert", chunk_size=8)
    g = torch.Generator().manual_seed(3)
    ids, ctx = torch.randint(3, 90, (2, 7), generator=g), torch.randint(3, 60, (2, 4, 8), generator=g)
    full = m(ids, context_input_ids=ctx).logits
    m.config.cross_attn_topk = 32  # = the context's 4 x 8 tokens
    torch.testing.assert_close(m(ids, context_input_ids=ctx).logits, full, rtol=0, atol=0)
    m.config.cross_attn_topk = 3
    read = []  # the absorbed policy reads the states with top-k (no per-call key projection)
    real = absorbed.attend_topk
    monkeypatch.setattr(absorbed, "attend_topk", lambda *a, **kw: read.append(1) or real(*a, **kw))
    outs = {}
    with torch.no_grad():
        for policy in ("recompute", "cache", "absorbed"):
            m.config.kv_policy = policy
            outs[policy] = m(ids, context_input_ids=ctx).logits
    assert (outs["recompute"] - full).abs().max() > 1e-4
    for policy in ("cache", "absorbed"):
        torch.testing.assert_close(outs[policy], outs["recompute"], rtol=1e-5, atol=1e-5)
    assert not read  # 7 query rows: the absorbed policy projects keys (absorbed_row_limit)
    with torch.no_grad():  # one row, as in a decoding step: it reads the states
        m.config.kv_policy = "cache"
        ref = m(ids[:, :1], context_input_ids=ctx).logits
        m.config.kv_policy = "absorbed"
        torch.testing.assert_close(m(ids[:, :1], context_input_ids=ctx).logits, ref, rtol=1e-5, atol=1e-5)
    assert len(read) == len(m.cross_attn)


def test_topk_setting_is_validated_and_overridable_on_load(tmp_path):
    m = tiny_cepe("llama", "bert")
    with pytest.raises(ValueError, match="cross_attn_topk"):
        CepeConfig(text_config=m.config.text_config, cross_attn_topk=0)
    m.save_pretrained(tmp_path / "a")
    def load(**kw):
        return CepeForCausalLM.from_pretrained(tmp_path / "a", decoder=m.decoder, encoder=tiny_bert(), **kw)

    assert load(cross_attn_topk="16").config.cross_attn_topk == 16
    assert load().config.cross_attn_topk is None
