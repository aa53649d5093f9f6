"""Core CEPE model behaviour on tiny random decoders of every supported family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, tiny_bert, tiny_cepe, tiny_decoder
from conftest import rand_context as _ctx
from conftest import rand_ids as _ids

from cepe import CepeConfig, CepeForCausalLM, ContextStates
from cepe.model.context import chunk_token_ids


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("encoder", ["bert", "decoder"])
def test_zero_init_equals_base(family, encoder):
    m = tiny_cepe(family, encoder, init="zero")
    ids = _ids()
    base = m.decoder(input_ids=ids).logits
    out = m(ids, context_input_ids=_ctx()).logits
    torch.testing.assert_close(out, base, rtol=0, atol=0)
    # copy init really changes the output (the hooks are live)
    m2 = tiny_cepe(family, encoder, init="copy")
    assert not torch.allclose(m2(ids, context_input_ids=_ctx()).logits, m2.decoder(input_ids=ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_no_context_equals_base(family):
    m = tiny_cepe(family, "bert", init="copy")
    ids = _ids()
    torch.testing.assert_close(m(ids).logits, m.decoder(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("encoder", ["bert", "decoder"])
def test_padding_chunks_and_tokens_do_not_change_logits(encoder):
    m = tiny_cepe("llama", encoder)
    ids = _ids(b=1)
    ctx = _ctx(b=1, n=2, length=10)
    mask = torch.ones_like(ctx)
    ref = m(ids, context_input_ids=ctx, context_attention_mask=mask).logits
    # an extra all-padding chunk, and padded tokens at the end of every chunk
    ctx2 = torch.cat([ctx, torch.full((1, 1, 10), 7)], dim=1)
    ctx2 = torch.cat([ctx2, torch.full((1, 3, 4), 5)], dim=2)
    mask2 = torch.zeros_like(ctx2)
    mask2[:, :2, :10] = 1
    out = m(ids, context_input_ids=ctx2, context_attention_mask=mask2).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_batch_with_different_chunk_counts_matches_single():
    m = tiny_cepe("qwen2", "bert")
    ids = _ids(b=2)
    c0, c1 = _ctx(b=1, n=3, seed=3), _ctx(b=1, n=1, seed=4)
    batch = torch.zeros((2, 3, 10), dtype=torch.long)
    mask = torch.zeros_like(batch)
    batch[0], mask[0] = c0[0], 1
    batch[1, :1], mask[1, :1] = c1[0], 1
    out = m(ids, context_input_ids=batch, context_attention_mask=mask).logits
    torch.testing.assert_close(out[0:1], m(ids[0:1], context_input_ids=c0).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1:2], m(ids[1:2], context_input_ids=c1).logits, rtol=1e-5, atol=1e-5)


def test_example_without_context_in_batch_equals_base():
    m = tiny_cepe("llama", "bert")
    ids = _ids(b=2)
    ctx = _ctx(b=2, n=2)
    mask = torch.ones_like(ctx)
    mask[1] = 0
    out = m(ids, context_input_ids=ctx, context_attention_mask=mask).logits
    torch.testing.assert_close(out[1], m.decoder(input_ids=ids[1:]).logits[0], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("encoder", ["bert", "decoder"])
def test_chunk_independence(encoder):
    m = tiny_cepe("llama", encoder)
    a, b = _ctx(b=1, n=2, seed=5), _ctx(b=1, n=2, seed=6)
    b[0, 0] = a[0, 0]  # same first chunk, different second chunk
    sa, sb = m.encode(a).hidden_states, m.encode(b).hidden_states
    torch.testing.assert_close(sa[:, :10], sb[:, :10], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(sa[:, 10:], sb[:, 10:])


@pytest.mark.parametrize("encoder", ["bert", "decoder"])
def test_encoder_slices_give_the_same_states_and_gradients(encoder):
    """encoder_chunks_per_pass bounds memory only: slicing the live chunks (padding chunks skipped)
    changes neither the states nor the gradients."""
    m = tiny_cepe("llama", encoder)  # eval: no dropout, gradients all the same
    ctx = _ctx(b=3, n=3, seed=7)
    mask = torch.ones_like(ctx)
    mask[1, 2] = 0  # one all-padding chunk among the live ones
    ids = _ids(b=3)
    outs = []
    for per_pass in (None, 2, 1):
        m.config.encoder_chunks_per_pass = per_pass
        m.zero_grad()
        states = m.encode(ctx, mask).hidden_states
        m(ids, context_input_ids=ctx, context_attention_mask=mask, labels=ids).loss.backward()
        outs.append((states.detach(), [p.grad.clone() for p in m.encoder.parameters() if p.grad is not None]))
    assert outs[0][1]
    for states, grads in outs[1:]:
        torch.testing.assert_close(states, outs[0][0], rtol=1e-5, atol=1e-6)
        for g, g0 in zip(grads, outs[0][1]):
            torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="encoder_chunks_per_pass"):
        CepeConfig(text_config=m.config.text_config, encoder_chunks_per_pass=0)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_incremental_decoding_matches_full_forward(family):
    m = tiny_cepe(family, "bert")
    ids = _ids(b=1, t=12)
    ctx = m.encode(_ctx(b=1))
    full = m(ids, context=ctx).logits
    out = m(ids[:, :8], context=ctx, use_cache=True)
    cache = out.past_key_values
    step = m(ids[:, 8:], context=ctx, past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(step, full[:, 8:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_policies_and_context_reuse_agree(family):
    m = tiny_cepe(family, "bert")
    ids = _ids(b=2, t=6)
    ctx_ids = _ctx(b=2)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    m.config.kv_policy = "recompute"
    a = m.generate(ids, context_input_ids=ctx_ids, **kw)
    m.config.kv_policy = "cache"
    b = m.generate(ids, context_input_ids=ctx_ids, **kw)
    c = m.generate(ids, context=m.encode(ctx_ids), **kw)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert a.shape == (2, 14)
    # the context matters for what is generated (copy init)
    none = m.generate(ids, **kw)
    assert torch.equal(none, m.decoder.generate(ids, **kw))


def test_generate_beam_search_and_shared_context():
    m = tiny_cepe("llama", "bert")
    ids = _ids(b=2, t=5)
    ctx = m.encode(_ctx(b=1))  # one document, two prompts
    out = m.generate(ids, context=ctx, max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0)
    assert out.shape[0] == 2
    each = m.generate(ids[:1], context=ctx, max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0)
    assert torch.equal(out[:1], each)


@pytest.mark.parametrize("encoder", ["bert", "decoder"])
def test_save_load_round_trip_exact(tmp_path, encoder):
    m = tiny_cepe("llama", encoder)
    with torch.no_grad():
        for p in m.adapter_parameters():
            p.add_(torch.randn_like(p) * 0.01)
    m.save_pretrained(tmp_path, max_shard_size=20_000)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "config.json" in files and any(f.endswith(".safetensors") for f in files)
    if len([f for f in files if f.endswith(".safetensors")]) > 1:
        assert "model.safetensors.index.json" in files
    from safetensors import safe_open

    keys = set()
    for f in tmp_path.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            keys |= set(fh.keys())
    assert keys and all(k.startswith(("encoder.", "cross_attn.")) for k in keys)
    assert not any("embed_tokens" in k for k in keys)
    loaded = CepeForCausalLM.from_pretrained(tmp_path, decoder=tiny_decoder("llama"), encoder=None)
    ids, ctx = _ids(), _ctx()
    torch.testing.assert_close(
        loaded.eval()(ids, context_input_ids=ctx).logits, m(ids, context_input_ids=ctx).logits, rtol=0, atol=0
    )


def test_load_refuses_other_base_and_corrupted_files(tmp_path):
    m = tiny_cepe("llama", "bert")
    m.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="another base decoder"):
        CepeForCausalLM.from_pretrained(tmp_path, decoder=tiny_decoder("llama", seed=9))
    (tmp_path / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match="model.safetensors"):
        CepeForCausalLM.from_pretrained(tmp_path, decoder=tiny_decoder("llama"))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        CepeForCausalLM.from_pretrained(tmp_path, decoder=tiny_decoder("llama"))


def test_bad_context_input_is_rejected():
    m = tiny_cepe("llama", "bert")
    ids = _ids()
    with pytest.raises(ValueError, match="vocabulary"):
        m(ids, context_input_ids=torch.full((2, 1, 8), 500))
    with pytest.raises(ValueError, match="positions"):
        m(ids, context_input_ids=torch.randint(3, 60, (2, 1, 100)))
    with pytest.raises(ValueError, match="chunk_size"):
        CepeForCausalLM.from_base(tiny_decoder(), tiny_bert(), chunk_size=1000)
    with pytest.raises(ValueError, match="cross_attn_layers"):
        CepeForCausalLM.from_base(tiny_decoder(), tiny_bert(), chunk_size=8, cross_attn_layers="some")


def test_layer_selection_and_gqa():
    m = CepeForCausalLM.from_base(
        tiny_decoder(), tiny_bert(), chunk_size=8, cross_attn_layers="every:2", cross_attn_num_kv_heads=1
    )
    assert list(m.cross_attn.keys()) == ["1"]
    blk = m.cross_attn["1"]
    assert blk.k_proj.weight.shape == (8, 24)  # one kv head of 8 dims, from the 24-wide encoder
    # k init = self-attention's two kv heads averaged, first 24 input columns
    w = m.decoder.model.layers[1].self_attn.k_proj.weight.view(2, 8, 32).mean(0)[:, :24]
    torch.testing.assert_close(blk.k_proj.weight, w)
    last = CepeForCausalLM.from_base(tiny_decoder(), tiny_bert(), chunk_size=8, cross_attn_layers="last:2")
    assert list(last.cross_attn.keys()) == ["1", "2"]


def test_context_states_save_load_and_fingerprint(tmp_path):
    m = tiny_cepe("llama", "bert")
    ctx = m.encode(_ctx(b=1))
    ctx.save(tmp_path / "c.safetensors")
    back = ContextStates.load(tmp_path / "c.safetensors")
    torch.testing.assert_close(back.hidden_states, ctx.hidden_states)
    assert back.encoder_hash == m.encoder_hash and m.encoder_hash.startswith("enc-")
    assert back.fingerprint == m.encoder_fingerprint == m.encoder_hash  # the old names still read
    ids = _ids(b=1)
    torch.testing.assert_close(m(ids, context=back).logits, m(ids, context=ctx).logits)
    other = tiny_cepe("llama", "bert")
    with torch.no_grad():
        next(other.encoder.parameters()).add_(1.0)
    with pytest.raises(ValueError, match="another encoder"):
        other(ids, context=back)
    (tmp_path / "bad.safetensors").write_bytes(b"xx")
    with pytest.raises(ValueError):
        ContextStates.load(tmp_path / "bad.safetensors")


def test_context_file_removed_while_read_is_missing_not_corrupt(tmp_path, monkeypatch):
    # another replica's eviction between the existence check and the read: safetensors raises a
    # RuntimeError; the store must see a missing file (404), not a corrupt one (which it deletes)
    import cepe.model.context as context_module

    m = tiny_cepe("llama", "bert")
    path = tmp_path / "c.safetensors"
    m.encode(_ctx(b=1)).save(path)

    def vanish(name, device="cpu"):
        Path(name).unlink()
        raise RuntimeError(f"unable to open file <{name}>: No such file or directory")

    monkeypatch.setattr(context_module, "load_file", vanish)
    with pytest.raises(FileNotFoundError):
        ContextStates.load(path)
    monkeypatch.setattr(context_module, "load_file", lambda name, device="cpu": (_ for _ in ()).throw(
        RuntimeError("CUDA out of memory")))
    m.encode(_ctx(b=1)).save(path)
    with pytest.raises(RuntimeError, match="out of memory"):  # not blamed on the file
        ContextStates.load(path)


def test_chunking_never_spans_documents():
    ids, mask = chunk_token_ids([[5] * 5, [6] * 3], chunk_size=4, pad_id=0, prefix=[1], suffix=[2])
    assert ids.tolist() == [[1, 5, 5, 5, 5, 2], [1, 5, 2, 0, 0, 0], [1, 6, 6, 6, 2, 0]]
    assert mask.sum(1).tolist() == [6, 3, 5]


def test_config_round_trip_and_auto_registration(tmp_path):
    from transformers import AutoConfig

    m = tiny_cepe("gemma3", "bert")
    m.config.save_pretrained(tmp_path)
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, CepeConfig)
    assert cfg.text_config.model_type == "gemma3_text" and cfg.encoder_config.model_type == "bert"
    assert json.loads((tmp_path / "config.json").read_text())["chunk_size"] == 8


def test_frozen_encoder_embeddings_are_not_saved_and_load_from_base(tmp_path):
    m = tiny_cepe("llama", "bert")
    m.freeze_encoder("embeddings")
    assert all(not p.requires_grad for n, p in m.encoder.named_parameters() if "embed" in n)
    assert all(p.requires_grad for p in m.adapter_parameters())
    with torch.no_grad():
        for p in m.adapter_parameters():
            p.add_(0.01)
    m.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert not any("embeddings" in k for k in keys) and any(k.startswith("encoder.") for k in keys)
    loaded = CepeForCausalLM.from_pretrained(tmp_path, decoder=tiny_decoder("llama"), encoder=tiny_bert())
    ids, ctx = _ids(), _ctx()
    torch.testing.assert_close(
        loaded.eval()(ids, context_input_ids=ctx).logits, m(ids, context_input_ids=ctx).logits, rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="frozen encoder"):
        CepeForCausalLM.from_pretrained(tmp_path, decoder=tiny_decoder("llama"), encoder=tiny_bert(seed=5))


def test_shared_context_cached_keys_values_match_recompute():
    m = tiny_cepe("llama", "bert")
    ids = _ids(b=3, t=5)
    ctx = m.encode(_ctx(b=1))
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    m.config.kv_policy = "recompute"
    a = m.generate(ids, context=ctx, **kw)
    m.config.kv_policy = "cache"
    b = m.generate(ids, context=ctx, **kw)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["roberta", "mpnet"])
def test_other_hf_encoders(kind):
    from transformers import MPNetConfig, MPNetModel, RobertaConfig, RobertaModel

    torch.manual_seed(2)
    common = dict(vocab_size=80, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=48, max_position_embeddings=40, pad_token_id=1)
    enc = (RobertaModel(RobertaConfig(**common), add_pooling_layer=False) if kind == "roberta"
           else MPNetModel(MPNetConfig(**common), add_pooling_layer=False)).eval()
    m = CepeForCausalLM.from_base(tiny_decoder(), enc, chunk_size=8, cross_attn_init="zero").eval()
    assert m.encoder.max_positions == 40 - 2  # position ids start after the padding index
    ids = _ids()
    ctx = torch.randint(3, 60, (2, 2, 10))
    torch.testing.assert_close(m(ids, context_input_ids=ctx).logits, m.decoder(input_ids=ids).logits)
    with pytest.raises(ValueError, match="positions"):
        m(ids, context_input_ids=torch.randint(3, 60, (2, 1, 39)))


def test_length_scaling_multiplies_logits_beyond_trained_length():
    """cross_attn_length_scaling=L: nothing changes for rows with <= L context tokens; a longer
    row equals the unscaled model with every block's softmax scale times log(L)/log(n); in a
    batch each row gets its own factor."""
    import math

    m = tiny_cepe("llama", "bert", chunk_size=8)
    ids = _ids(b=2)
    long_ctx, short_ctx = _ctx(b=1, n=4, length=10, seed=5), _ctx(b=1, n=1, length=10, seed=6)  # 40 / 10 real tokens
    ref_long, ref_short = m(ids[:1], context_input_ids=long_ctx).logits, m(ids[1:], context_input_ids=short_ctx).logits
    m.config.cross_attn_length_scaling = 16
    torch.testing.assert_close(m(ids[1:], context_input_ids=short_ctx).logits, ref_short)  # 10 <= 16: untouched
    scaled_long = m(ids[:1], context_input_ids=long_ctx).logits
    assert (scaled_long - ref_long).abs().max() > 1e-4
    m.config.cross_attn_length_scaling = None
    for block in m.cross_attn.values():
        block.scaling *= math.log(16) / math.log(40)
    torch.testing.assert_close(m(ids[:1], context_input_ids=long_ctx).logits, scaled_long, rtol=1e-5, atol=1e-5)
    for block in m.cross_attn.values():
        block.scaling /= math.log(16) / math.log(40)
    m.config.cross_attn_length_scaling = 16
    batch = torch.zeros((2, 4, 10), dtype=torch.long)
    mask = torch.zeros_like(batch)
    batch[0], mask[0] = long_ctx[0], 1
    batch[1, :1], mask[1, :1] = short_ctx[0], 1
    out = m(ids, context_input_ids=batch, context_attention_mask=mask).logits
    torch.testing.assert_close(out[:1], scaled_long, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1:], ref_short, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cross_attn_length_scaling"):
        CepeConfig(text_config=m.config.text_config, cross_attn_length_scaling=1)


def test_shared_context_projected_once_equals_repeated_context():
    """One context for B prompts (expanded, keys/values projected once on the parent) gives the
    logits of the same context repeated B times, under the per-step `recompute` policy too."""
    m = tiny_cepe("llama", "bert")
    ids = _ids(b=3, t=6)
    ctx = m.encode(_ctx(b=1))
    repeated = ContextStates(ctx.hidden_states.repeat(3, 1, 1), ctx.attention_mask.repeat(3, 1), ctx.encoder_hash)
    for policy in ("recompute", "cache"):
        m.config.kv_policy = policy
        fresh = ContextStates(ctx.hidden_states, ctx.attention_mask, ctx.encoder_hash)
        torch.testing.assert_close(m(ids, context=fresh).logits, m(ids, context=repeated).logits, rtol=1e-5, atol=1e-5)


def test_length_scaling_override_on_load_is_validated(tmp_path):
    m = tiny_cepe("llama", "bert")
    m.save_pretrained(tmp_path / "a")
    dec = m.decoder
    loaded = CepeForCausalLM.from_pretrained(
        tmp_path / "a", decoder=dec, encoder=tiny_bert(), cross_attn_length_scaling="64"
    )
    assert loaded.config.cross_attn_length_scaling == 64
    with pytest.raises(ValueError, match="cross_attn_length_scaling"):
        CepeForCausalLM.from_pretrained(tmp_path / "a", decoder=dec, encoder=tiny_bert(), cross_attn_length_scaling=1)


def test_run_time_overrides_on_load_and_auto_class(tmp_path):
    """from_pretrained takes run-time settings (validated), refuses any other keyword, and the
    Auto class loads an adapter folder to the same model."""
    from transformers import AutoModelForCausalLM

    m = tiny_cepe("llama", "decoder")
    m.save_pretrained(tmp_path)
    dec = m.decoder
    loaded = CepeForCausalLM.from_pretrained(tmp_path, decoder=dec, kv_policy="cache", encoder_chunks_per_pass="2")
    assert loaded.config.kv_policy == "cache" and loaded.config.encoder_chunks_per_pass == 2
    for bad, err in [({"kv_policy": "cach"}, ValueError), ({"encoder_chunks_per_pass": 0}, ValueError),
                     ({"kv_cache_budget_bytes": -1}, ValueError), ({"kv_polcy": "cache"}, TypeError)]:
        with pytest.raises(err, match=next(iter(bad))):
            CepeForCausalLM.from_pretrained(tmp_path, decoder=dec, **bad)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path, decoder=dec, kv_policy="auto")
    assert isinstance(auto, CepeForCausalLM) and auto.config.kv_policy == "auto"
    ids, ctx = _ids(), _ctx(vocab=90)
    torch.testing.assert_close(
        auto.eval()(ids, context_input_ids=ctx).logits, loaded.eval()(ids, context_input_ids=ctx).logits
    )
    with pytest.raises(ValueError, match="kv_policy"):
        AutoModelForCausalLM.from_pretrained(tmp_path, decoder=dec, kv_policy="cach")


def test_length_scaling_is_not_applied_under_topk_attention():
    """Top-k attention's softmax spans k keys at any context length: with `cross_attn_topk` set,
    a long row's logits are the unscaled ones, and `applied_length_scaling` says so."""
    m = tiny_cepe("llama", "bert", chunk_size=8)
    ids, long_ctx = _ids(b=1), _ctx(b=1, n=4, length=10, seed=5)  # 40 real context tokens
    full_unscaled = m(ids, context_input_ids=long_ctx).logits
    m.config.cross_attn_topk = 8
    unscaled = m(ids, context_input_ids=long_ctx).logits
    m.config.cross_attn_length_scaling = 16
    assert m.config.applied_length_scaling is None
    torch.testing.assert_close(m(ids, context_input_ids=long_ctx).logits, unscaled)
    m.config.cross_attn_topk = None
    assert m.config.applied_length_scaling == 16
    assert (m(ids, context_input_ids=long_ctx).logits - full_unscaled).abs().max() > 1e-4  # full attention: scaled
