"""Cross-attention from encoder states with absorbed projections equals the key/value cache path,
for every decoder family, head layout, padding, logit scale and kernel; stored-state accounting
and 8-bit states."""

from __future__ import annotations

import functools
import os

import pytest
import torch
from conftest import FAMILIES, tiny_cepe, tiny_decoder_config

from cepe.model.absorbed import absorb, absorbed_cross_attention, absorbed_weight_reads, attend
from cepe.model.cross_attention import CrossAttention
from cepe.model.stored_states import (
    quantize_states,
    state_bytes_per_token,
    storage_per_token,
)


def _triton_interpreter() -> bool:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


TRITON = pytest.param("triton", marks=pytest.mark.skipif(not _triton_interpreter(),
                                                          reason="needs triton and TRITON_INTERPRET=1 on the CPU"))


@functools.cache
def _blocks(family: str, kv_heads: int):
    model = tiny_cepe(family, cross_attn_num_kv_heads=kv_heads)
    return list(model.cross_attn.values())


def _inputs(block: CrossAttention, t: int = 2, s: int = 13, seed: int = 0):
    """Three rows: full context, padded context, no context at all."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(3, t, block.q_proj.in_features, generator=g)
    states = torch.randn(3, s, block.k_proj.in_features, generator=g) * 2
    mask = torch.ones(3, s, dtype=torch.bool)
    mask[1, 5:] = False
    mask[1, 0] = False
    mask[2] = False
    scale = torch.tensor([1.0, 0.7, 0.9])
    return h, states, mask, scale


def _cache_path(block, h, states, mask, scale):
    return block(h, *block.project_kv(states), mask, scale)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("form", ["factored", "fused"])
def test_absorbed_equals_cache_path_in_every_family_and_head_layout(family, kv_heads, form):
    blocks = _blocks(family, kv_heads)
    assert blocks[0].num_kv_heads == kv_heads and blocks[0].num_heads == 4
    for i, block in enumerate(blocks):
        h, states, mask, scale = _inputs(block, seed=i)
        weights = absorb(block, form)
        with torch.no_grad():
            ref = _cache_path(block, h, states, mask, scale)
            out = absorbed_cross_attention(block, h, states, mask, scale, weights=weights, kernel="matmul")
            assert ref[:2].abs().amax() > 1e-2  # the block really adds something
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
            assert torch.equal(out[2], torch.zeros_like(out[2]))  # no context: exactly nothing
            # no mask, no scale: the fast path of the cache route
            ref = _cache_path(block, h, states, None, None)
            out = absorbed_cross_attention(block, h, states, None, None, weights=weights, kernel="matmul")
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel", ["matmul", "chunked", TRITON])
@pytest.mark.parametrize("t", [1, 3])
def test_every_kernel_gives_the_cache_paths_delta(kernel, t):
    block = _blocks("llama", 2)[0]
    h, states, mask, scale = _inputs(block, t=t, s=150)
    with torch.no_grad():
        ref = _cache_path(block, h, states, mask, scale)
        out = absorbed_cross_attention(block, h, states, mask, scale, kernel=kernel)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel", ["matmul", "chunked", TRITON])
def test_attention_over_states_kernels_against_float64(kernel):
    """The kernels alone, with splits and chunks that do not divide the context, a row whose
    real keys all sit in one split, and a row with none."""
    g = torch.Generator().manual_seed(1)
    q, e = torch.randn(3, 6, 40, generator=g), torch.randn(3, 300, 40, generator=g)
    mask = torch.ones(3, 300, dtype=torch.bool)
    mask[0, :70] = False
    mask[1, 20:] = False
    mask[2] = False
    ref = attend(q.double(), e.double(), mask, kernel="matmul")
    if kernel == "triton":
        from cepe.kernels.absorbed_decode import attend_states

        out = attend_states(q, e, mask, block_s=16, splits=7)
        # the tokens-as-M layout of the same products gives the same result
        torch.testing.assert_close(attend_states(q, e, mask, block_s=16, splits=5, transposed=True), out,
                                   rtol=1e-5, atol=1e-6)
    elif kernel == "chunked":
        from cepe.model.absorbed import attend_chunked

        out = attend_chunked(q, e, mask, chunk=64)
    else:
        out = attend(q, e, mask, kernel=kernel)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert ref[0].abs().amax() > 0.05


@pytest.mark.parametrize("kernel", ["matmul", "chunked", TRITON])
def test_bfloat16_absorbed_is_as_close_to_the_truth_as_the_cache_path(kernel):
    """In bf16 neither path is exact; the absorbed one must not be worse than the cache path
    beyond rounding (both against a float64 reference of the same block)."""
    block = _blocks("llama", 2)[1]
    h, states, mask, scale = _inputs(block, t=1, s=200)
    with torch.no_grad():
        exact = _cache_path(_to(block, torch.float64), h.double(), states.double(), mask, scale.double())
        b16 = _to(block, torch.bfloat16)
        hb, sb = h.bfloat16(), states.bfloat16()
        cache = _cache_path(b16, hb, sb, mask, scale).double()
        out = absorbed_cross_attention(b16, hb, sb, mask, scale, kernel=kernel).double()
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    err_cache = ((cache - exact).norm() / exact.norm()).item()
    err_abs = ((out - exact).norm() / exact.norm()).item()
    assert err_cache < 0.05 and err_abs < 2 * err_cache + 5e-3, (err_abs, err_cache)


@pytest.mark.parametrize("kernel", ["matmul", "chunked", TRITON])
def test_8bit_states_give_the_delta_of_their_dequantized_values(kernel):
    """The kernel reads int8 data and folds each token's scale into its logit and its weight;
    the PyTorch paths dequantize. Either way: the cache path's delta over the dequantized states."""
    block = _blocks("llama", 2)[0]
    h, states, mask, scale = _inputs(block, t=1, s=150)
    packed = quantize_states(states, "int8")
    with torch.no_grad():
        ref = _cache_path(block, h, packed.dequantize(), mask, scale)
        out = absorbed_cross_attention(block, h, packed, mask, scale, kernel=kernel)
        plain = _cache_path(block, h, states, mask, scale)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ref, plain, rtol=1e-4, atol=1e-5)  # the 8-bit rounding is really there


@pytest.mark.parametrize("topk", [1, 4, 200])
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_topk_over_states_equals_the_cache_paths_topk(topk, kv_heads):
    """`cross_attn_topk` read from the states (the absorbed policy at a million tokens) picks the
    same k keys per query head as the projected keys do: padding, no context, logit scale, 8-bit
    states; k above the context length is full attention."""
    block = _blocks("llama", kv_heads)[0]
    h, states, mask, scale = _inputs(block, t=2, s=150)
    with torch.no_grad():
        ref = block(h, *block.project_kv(states), mask, scale, topk=topk)
        out = absorbed_cross_attention(block, h, states, mask, scale, topk=topk)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        assert torch.equal(out[2], torch.zeros_like(out[2]))
        full = _cache_path(block, h, states, mask, scale)
        assert torch.allclose(out, full, rtol=1e-4, atol=1e-5) == (topk == 200)
        packed = quantize_states(states, "int8")
        ref = block(h, *block.project_kv(packed.dequantize()), mask, scale, topk=topk)
        torch.testing.assert_close(absorbed_cross_attention(block, h, packed, mask, scale, topk=topk), ref,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel", ["matmul", "chunked"])
def test_absorbed_step_never_hands_a_value_to_the_host(kernel):
    """A decoding step must be capturable as a CUDA graph: no op may read a device value on the
    host (padding and empty rows are handled without a data-dependent branch)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Syncs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in {"_local_scalar_dense", "is_nonzero", "equal", "item"}:
                self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    block = _blocks("qwen2", 2)[0]
    h, states, mask, scale = _inputs(block, t=1)
    weights = absorb(block)
    with torch.no_grad(), Syncs() as mode:
        absorbed_cross_attention(block, h, states, mask, scale, weights=weights, kernel=kernel)
    assert mode.seen == []


def _to(block, dtype):
    import copy

    return copy.deepcopy(block).to(dtype)


def test_fused_form_only_when_it_reads_fewer_weights():
    with torch.device("meta"):
        llama = CrossAttention(4096, 1024, 32, 8, 128, torch.nn.Identity())
        narrow = CrossAttention(256, 16, 4, 2, 64, torch.nn.Identity())
    reads = absorbed_weight_reads(llama)
    assert reads == {"factored": 2 * 32 * 128 * 4096 + 2 * 8 * 128 * 1024, "fused": 2 * 32 * 1024 * 4096}
    assert reads["fused"] > 7 * reads["factored"]
    assert absorb(_blocks("llama", 2)[0]).form == "factored"  # He 24 > d 8
    assert absorbed_weight_reads(narrow)["fused"] < absorbed_weight_reads(narrow)["factored"]
    with pytest.raises(ValueError):
        absorb(_blocks("llama", 2)[0], "product")


# ---------------------------------------------------------------- stored states
def test_storage_per_token_for_llama2_7b_shapes():
    with torch.device("meta"):
        blocks = [CrossAttention(4096, 1024, 32, 8, 128, torch.nn.Identity()) for _ in range(32)]
    cfg = tiny_decoder_config("llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=32)
    acc = storage_per_token(blocks, "bfloat16", decoder_config=cfg)
    assert acc["states"] == 2048 and acc["cross_kv_cache"] == 128 * 1024 and acc["full_attention_kv"] == 512 * 1024
    assert acc["cache_over_states"] == 64 and acc["full_over_states"] == 256
    assert state_bytes_per_token(1024, "int8") == 1028 and state_bytes_per_token(1024, "fp8") == 1028
    with pytest.raises(ValueError):
        state_bytes_per_token(1024, "int4")


@pytest.mark.parametrize("fmt,bound", [("int8", 0.5 / 127), ("fp8", 2.0**-4)])
def test_quantized_states_round_trip(fmt, bound):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 48, generator=g) * torch.logspace(-2, 2, 64)[None, :, None]  # token scales differ
    q = quantize_states(x.bfloat16(), fmt)
    assert q.data.element_size() == 1 and q.nbytes == 2 * 64 * (48 + 4)
    back = q.dequantize()
    assert back.dtype == torch.bfloat16 and back.shape == x.shape
    xb = x.bfloat16().float()
    amax = xb.abs().amax(dim=-1, keepdim=True)
    err = (back.float() - xb).abs()
    if fmt == "int8":  # half a step of the token's own scale (plus bf16 rounding of the result)
        assert (err <= amax * bound * 1.01 + xb.abs() * 2**-8).all()
    else:  # e4m3: 3 mantissa bits, relative half-ulp 2^-4 for values in the normal range
        normal = xb.abs() > amax * 2**-6 / 448 * 64
        assert (err[normal] <= xb.abs()[normal] * (bound + 2**-8)).all()
    rel = ((back.float() - xb).norm(dim=-1) / xb.norm(dim=-1)).max()
    assert 0 < rel < (0.01 if fmt == "int8" else 0.05)
    with pytest.raises(ValueError):
        quantize_states(x, "int4")
