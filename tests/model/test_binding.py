"""The context reaches cross-attention as an argument of each forward, not as model state: other
forwards in between (a teacher, another model on the same decoder, a failed call) change nothing."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, tiny_cepe

from cepe import CepeForCausalLM


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 90, (2, 7), generator=g), torch.randint(3, 60, (2, 3, 8), generator=g)


def _grads(m, teacher_between: bool):
    ids, ctx = _batch()
    m.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same encoder dropout in both runs
    loss = m(ids, context_input_ids=ctx, labels=ids).loss
    if teacher_between:  # the decoder alone, as distillation's online teacher runs it
        with torch.no_grad():
            m(ids, use_cache=False)
    loss.backward()
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_forward_between_forward_and_backward_changes_no_gradient(family):
    """Gradient checkpointing recomputes each layer in backward: the student's context must
    still reach it after a teacher forward without context ran in between."""
    m = tiny_cepe(family, "bert").train()
    m.gradient_checkpointing_enable()
    plain, between = _grads(m, False), _grads(m, True)
    assert plain and plain.keys() == between.keys()
    for name in plain:
        torch.testing.assert_close(between[name], plain[name], rtol=0, atol=0, msg=name)


def test_two_models_on_one_decoder_do_not_see_each_others_context(tmp_path):
    a = tiny_cepe("llama", "bert")
    a.save_pretrained(tmp_path)
    b = CepeForCausalLM.from_pretrained(tmp_path, decoder=a.decoder).eval()  # hooks on the same layers
    with torch.no_grad():
        for cross in b.cross_attn.values():
            cross.o_proj.weight.mul_(2)  # b's cross-attention now differs from a's
    ids, ctx = _batch()
    with torch.no_grad():
        base = a.decoder(ids).logits
        ya, yb = a(ids, context_input_ids=ctx).logits, b(ids, context_input_ids=ctx).logits
        assert not torch.allclose(ya, base) and not torch.allclose(ya, yb)
        torch.testing.assert_close(a(ids, context_input_ids=ctx).logits, ya, rtol=0, atol=0)
        torch.testing.assert_close(b(ids).logits, base, rtol=0, atol=0)


def test_a_failed_forward_leaves_nothing_bound():
    m = tiny_cepe("llama", "bert")
    ids, ctx = _batch()
    layer = m.decoder.model.layers[1]
    handle = layer.mlp.register_forward_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        m(ids, context_input_ids=ctx)
    handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, m.decoder(ids).logits, rtol=0, atol=0)
