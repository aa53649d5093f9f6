"""Training through a CEPE model: gradients reach only the new parameters, and activation
checkpointing (decoder and encoder) leaves them unchanged."""

from __future__ import annotations

import pytest
import torch
from conftest import rand_context as _ctx
from conftest import rand_ids as _ids
from conftest import tiny_cepe


def test_gradients_reach_only_new_parameters():
    m = tiny_cepe("llama", "bert").train()
    before = {k: v.clone() for k, v in m.decoder.state_dict().items()}
    opt = torch.optim.AdamW(m.adapter_parameters(), lr=1e-2)
    ids = _ids()
    loss = m(ids, context_input_ids=_ctx(), labels=ids).loss
    loss.backward()
    assert all(p.grad is None for p in m.decoder.parameters())
    assert all(p.grad is not None for p in m.cross_attn.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.encoder.parameters())
    opt.step()
    for k, v in m.decoder.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_gradient_checkpointing_gives_same_gradients():
    ids, ctx = _ids(), _ctx()
    grads = []
    for ckpt in (False, True):
        m = tiny_cepe("llama", "bert").train()
        if ckpt:
            m.gradient_checkpointing_enable()
        m(ids, context_input_ids=ctx, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.cross_attn.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("encoder", ["bert", "decoder"])
def test_encoder_checkpointing_gives_same_gradients(encoder):
    ids, ctx = _ids(), _ctx()
    grads = []
    for ckpt in (False, True):
        m = tiny_cepe("llama", encoder).train()
        if ckpt:
            m.gradient_checkpointing_enable(decoder=False, encoder=True)
            assert m.encoder.model.is_gradient_checkpointing and not m.decoder.is_gradient_checkpointing
        m(ids, context_input_ids=ctx, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.adapter_parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    m.gradient_checkpointing_disable()
    assert not m.encoder.model.is_gradient_checkpointing and not m.is_gradient_checkpointing


def test_encoder_checkpointing_needs_a_transformers_encoder():
    # an encoder without a transformers model inside says so, instead of an AttributeError mid-setup
    m = tiny_cepe("llama", "bert")
    m.encoder.model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="encoder checkpointing"):
        m.gradient_checkpointing_enable(decoder=False, encoder=True)
