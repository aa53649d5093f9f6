"""fp8 absorbed decoding (`cepe.model.absorbed_fp8`): the same quantized arithmetic emulated in
float32, the attention over dequantized states within fp8's precision, masks and empty rows."""

from __future__ import annotations

import pytest
import torch

from cepe.model.absorbed import attend_matmul
from cepe.model.absorbed_fp8 import FP8, pack_fp8, attend_fp8
from cepe.model.stored_states import quantize_states


def _inputs(b=2, r=8, s=101, he=64, q_scale=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(b, s, he, generator=g) * torch.linspace(0.5, 3, s)[None, :, None]
    return torch.randn(b, r, he, generator=g) * q_scale, states


def _emulated(q, packed, mask):
    """attend_fp8's steps in float32: fp8 query rows, bf16 logits, fp8 probability rows."""
    def row_fp8(x):
        scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 448
        return (x / scale).to(FP8).float() * scale

    s = packed.length
    data = packed.data[:, :s].float() * packed.scale[:, :s, None]
    logits = (row_fp8(q.float()) @ data.transpose(1, 2)).bfloat16().float()
    logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
    p = torch.nan_to_num(logits.softmax(-1), nan=0.0)
    return row_fp8(p * packed.scale[:, None, :s]) @ packed.data[:, :s].float()


def test_fp8_attention_is_its_quantized_arithmetic_and_close_to_the_states_attention():
    q, states = _inputs()
    mask = torch.ones(2, 101, dtype=torch.bool)
    mask[1, 60:] = False
    packed = pack_fp8(states)
    assert packed.data.shape == (2, 112, 64) and packed.data_t.shape == (2, 64, 112)  # padded to 16
    assert packed.data.dtype == FP8 and (packed.scale[:, 101:] == 0).all()
    got = attend_fp8(q, packed, mask).float()
    want = _emulated(q, packed, mask)
    assert ((got - want).norm() / want.norm()).item() < 1e-2  # bf16 output rounding
    exact = attend_matmul(q, quantize_states(states, "fp8").dequantize().float(), mask)
    assert ((got - exact).norm() / exact.norm()).item() < 0.08  # fp8 queries and probabilities
    unmasked = attend_fp8(q, packed).float()  # the padding to 16 is never attended
    assert ((unmasked - _emulated(q, packed, torch.ones(2, 101, dtype=torch.bool))).norm() / unmasked.norm()) < 1e-2


def test_rows_without_a_real_key_get_zeros_and_odd_widths_are_refused():
    q, states = _inputs()
    mask = torch.zeros(2, 101, dtype=torch.bool)
    mask[0, :5] = True
    out = attend_fp8(q, pack_fp8(states), mask)
    assert out.dtype == q.dtype and torch.equal(out[1], torch.zeros_like(out[1])) and out[0].abs().sum() > 0
    with pytest.raises(ValueError, match="multiple of 16"):
        pack_fp8(torch.randn(1, 8, 40))


def test_fused_probabilities_match_the_in_place_path():
    # fused=True runs the work between the matmuls through torch.compile (one graph for every
    # length): the same answer as the default in-place bf16 path, masks and empty rows included
    q, states = _inputs()
    mask = torch.ones(2, 101, dtype=torch.bool)
    mask[1] = False
    packed = pack_fp8(states)
    fused = attend_fp8(q, packed, mask, fused=True).float()
    plain = attend_fp8(q, packed, mask).float()
    assert torch.equal(fused[1], torch.zeros_like(fused[1])) and fused[0].abs().sum() > 0
    assert ((fused - plain).norm() / plain.norm()).item() < 2e-2  # bf16 vs float32 probabilities
    want = _emulated(q, packed, mask)
    assert ((fused - want).norm() / want.norm()).item() < 2e-2
    shorter = pack_fp8(states[:, :77])  # another length: no recompile error, still close
    got, ref = attend_fp8(q, shorter, fused=True).float(), attend_fp8(q, shorter).float()
    assert ((got - ref).norm() / ref.norm()).item() < 2e-2
