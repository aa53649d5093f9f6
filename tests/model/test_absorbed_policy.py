"""kv_policy="absorbed": decoding steps read the encoder states through absorbed projections and
give what the key/value cache gives (fp32, every family, both encoder kinds), keep no keys/values,
fall back in training, follow changed weights; `auto` picks it when the cache does not fit."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, tiny_cepe

from cepe import ContextStates
from cepe.model import cross_step
from cepe.model.absorbed import absorbed_row_limit
from cepe.model.configuration import CepeConfig, apply_runtime_settings

TIGHT = {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture
def absorbed_calls(monkeypatch):
    """Every `absorbed_delta` call the model makes: (query rows B, rows of the states read, used)."""
    calls = []
    real = cross_step.absorbed_delta

    def spy(block, h, context, *args, **kwargs):
        out = real(block, h, context, *args, **kwargs)
        calls.append((h.shape[0], context.batch_size, out is not None))
        return out

    monkeypatch.setattr(cross_step, "absorbed_delta", spy)
    return calls


def _model(family, encoder):
    m = tiny_cepe(family, encoder)
    m.config.cross_attn_length_scaling = 6  # rows with more than 6 real context tokens are scaled
    return m


def _context_ids(b):
    """(b, 3, 8) chunk ids; the second example has one short chunk (padding in the states)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 60, (b, 3, 8), generator=g)
    mask = torch.ones_like(ids)
    if b > 1:
        mask[1, 1:] = 0
        mask[1, 0, 5:] = 0
    return ids * mask, mask


def _prompts(b, t=7):
    """(b, t) ids and a left-padded attention mask (row 1 starts 3 tokens late)."""
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 90, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids * mask, mask


def _generate(m, policy, ids, mask, **context):
    m.config.kv_policy = policy
    out = m.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                     return_dict_in_generate=True, output_logits=True, **context)
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("encoder", ["bert", "decoder"])
@pytest.mark.parametrize("family", FAMILIES)
def test_absorbed_generation_equals_cache(family, encoder, absorbed_calls):
    """Greedy tokens and every step's logits: padded contexts, a left-padded batch, length scaling
    on; then one context shared by three prompts (an expanded context)."""
    m = _model(family, encoder)
    block = next(iter(m.cross_attn.values()))
    assert 3 <= absorbed_row_limit(block) < 7  # decoding steps read the states, the 7-token prefill projects
    cids, cmask = _context_ids(2)
    ids, mask = _prompts(2)
    ref_tokens, ref_logits = _generate(m, "cache", ids, mask, context_input_ids=cids, context_attention_mask=cmask)
    assert not absorbed_calls
    tokens, logits = _generate(m, "absorbed", ids, mask, context_input_ids=cids, context_attention_mask=cmask)
    torch.testing.assert_close(logits, ref_logits, **TIGHT)
    assert torch.equal(tokens, ref_tokens)
    used = [c for c in absorbed_calls if c[2]]
    assert len(used) == 4 * len(m.cross_attn)  # 4 decoding steps x layers; the prefill declined
    assert len(absorbed_calls) == 5 * len(m.cross_attn)

    absorbed_calls.clear()
    shared = m.encode(*_context_ids(1))
    ids, mask = _prompts(3)
    ref_tokens, ref_logits = _generate(m, "cache", ids, mask, context=shared)
    tokens, logits = _generate(m, "absorbed", ids, mask, context=shared)
    torch.testing.assert_close(logits, ref_logits, **TIGHT)
    assert torch.equal(tokens, ref_tokens)
    # the three rows read the one parent row of states: nothing repeated
    assert {c[:2] for c in absorbed_calls if c[2]} == {(3, 1)}


@pytest.mark.parametrize("encoder", ["bert", "decoder"])
def test_absorbed_forward_keeps_no_keys_values(encoder, absorbed_calls):
    """Short query blocks (prefill included) on a padded and on an expanded context: the cache's
    logits, no per-layer keys/values held, the policy recorded."""
    m = _model("llama", encoder)
    ids, mask = _prompts(2, t=2)
    for ctx_batch in (2, 1):
        cids, cmask = _context_ids(ctx_batch)
        ctx = m.encode(cids, cmask)
        with torch.no_grad():
            m.config.kv_policy = "cache"
            ref = m(ids, attention_mask=mask, context=ContextStates(ctx.hidden_states, ctx.attention_mask)).logits
            m.config.kv_policy = "absorbed"
            out = m(ids, attention_mask=mask, context=ctx).logits
        torch.testing.assert_close(out, ref, **TIGHT)
        assert ctx.cross_cache.policy == "absorbed" and not ctx.cross_cache.filled
        held = ctx.cross_cache.nbytes() - 4 * ctx_batch  # the length-scaling factors (B,) float32
        assert ctx.cross_cache.logit_scale(ctx.attention_mask, 6) is not None
        if ctx_batch == 2:
            assert held == 0
        else:  # only the expansion's own states and mask, no keys/values
            wide = ctx.expanded(2)  # one example repeated as a view: no copy of the states either
            assert wide.hidden_states.data_ptr() == ctx.hidden_states.data_ptr()
            assert not wide.cross_cache.filled and held == wide.nbytes() == 0
    assert absorbed_calls and all(c[2] for c in absorbed_calls)
    assert {c[:2] for c in absorbed_calls} == {(2, 2), (2, 1)}


def test_auto_chooses_absorbed_when_the_cache_does_not_fit(absorbed_calls):
    m = tiny_cepe("qwen2", "bert")
    ctx = m.encode(*_context_ids(2))
    m.config.kv_policy = "auto"
    ids = torch.tensor([[5, 6], [7, 8]])
    for budget, chosen in ((m.cross_kv_cache_bytes(ctx) - 1, "absorbed"), (m.cross_kv_cache_bytes(ctx), "cache")):
        m.config.kv_cache_budget_bytes = budget
        fresh = ContextStates(ctx.hidden_states, ctx.attention_mask)
        with torch.no_grad():
            m(ids, context=fresh)
        assert fresh.cross_cache.policy == chosen
        # `cache` also holds the fp32 padding bias (B, S) its steps read (`ContextBias`)
        bias = 0 if bool(ctx.attention_mask.all()) else ctx.attention_mask.numel() * 4
        assert fresh.cross_cache.nbytes() == (0 if chosen == "absorbed" else m.cross_kv_cache_bytes(ctx) + bias)
    assert len(absorbed_calls) == len(m.cross_attn)


def test_training_falls_back_and_gradients_reach_the_key_projection(absorbed_calls):
    m = _model("llama", "bert")
    m.config.kv_policy = "absorbed"
    ids = torch.tensor([[5, 6, 7]])
    ctx = m.encode(*_context_ids(1))
    m.train()
    m(ids, context=ctx, labels=ids).loss.backward()
    assert not absorbed_calls and ctx.cross_cache.policy is None
    assert all(b.k_proj.weight.grad is not None and b.k_proj.weight.grad.abs().sum() > 0 for b in m.cross_attn.values())


def test_changed_adapter_weights_are_absorbed_afresh(absorbed_calls):
    m = _model("mistral", "bert")
    ctx = m.encode(*_context_ids(2))
    ids = torch.tensor([[5], [6]])

    def logits(policy):
        m.config.kv_policy = policy
        with torch.no_grad():
            return m(ids, context=ContextStates(ctx.hidden_states, ctx.attention_mask)).logits

    before = logits("absorbed")
    torch.testing.assert_close(before, logits("cache"), **TIGHT)
    with torch.no_grad():
        for b in m.cross_attn.values():  # in place, as an optimizer step or load_adapter_weights does
            b.k_proj.weight.mul_(3.0)
            b.v_proj.weight.mul_(-0.5)
    after = logits("absorbed")
    assert (after - before).abs().amax() > 1e-3
    torch.testing.assert_close(after, logits("cache"), **TIGHT)
    assert m.absorbed_weights.nbytes() > 0


def test_policy_names_are_validated():
    m = tiny_cepe("llama", "bert")
    apply_runtime_settings(m.config, {"kv_policy": "absorbed"})
    assert m.config.kv_policy == "absorbed"
    for bad in ("absorb", "Absorbed", None):
        with pytest.raises(ValueError, match="kv_policy"):
            apply_runtime_settings(m.config, {"kv_policy": bad})
        with pytest.raises(ValueError, match="kv_policy"):
            CepeConfig(text_config=m.config.text_config, kv_policy=bad)
    assert CepeConfig(text_config=m.config.text_config, kv_policy="absorbed").kv_policy == "absorbed"


@pytest.mark.parametrize("states", ["fp8", "fp8-compiled"])
def test_fp8_states_decode_near_the_native_states(states):
    """absorbed_states="fp8": decoding steps read an fp8 copy of the states, packed once per context
    and counted in its cache; logits stay within fp8's rounding of the native path's."""
    m = _model("llama", "decoder")
    ids, mask = _prompts(2)
    native = m.encode(*_context_ids(2))
    _, ref = _generate(m, "absorbed", ids, mask, context=native)
    apply_runtime_settings(m.config, {"absorbed_states": states})
    ctx = m.encode(*_context_ids(2))
    _, got = _generate(m, "absorbed", ids, mask, context=ctx)
    packed = ctx.cross_cache.fp8_states(ctx.hidden_states)
    assert packed.data.dtype == torch.float8_e4m3fn and ctx.cross_cache.fp8_states(ctx.hidden_states) is packed
    assert ctx.cross_cache.nbytes() == packed.nbytes and native.cross_cache.nbytes() == 0
    err = ((got - ref).norm() / ref.norm()).item()
    assert 0 < err < 0.02, err  # the prefill projects keys/values as before: only the steps differ
    with pytest.raises(ValueError, match="absorbed_states"):
        apply_runtime_settings(m.config, {"absorbed_states": "int4"})
    with pytest.raises(ValueError, match="absorbed_states"):
        CepeConfig(absorbed_states="bf16")
