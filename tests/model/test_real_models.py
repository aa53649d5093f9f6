"""Real pretrained models: SmolLM2-135M-Instruct + all-MiniLM-L6-v2, installed by `cepe assets`
(the README's set-up command does this, so these tests run in CI)."""

from __future__ import annotations

import math

import pytest
import torch

from cepe import CepeForCausalLM, assets

pytestmark = pytest.mark.real

TEXT = (
    "The library at the end of the street had been closed for years, but every morning the old "
    "caretaker still unlocked the front door, swept the steps, and sat at the desk by the window. "
    "Children walking to school would wave at him, and he would raise his hand without looking up "
    "from the book he was reading. Nobody knew where the books came from, since the shelves had "
    "been emptied long ago, yet there was always a new one on the desk."
)


@pytest.fixture(scope="module")
def real_model():
    if not (assets.is_installed("smollm2-135m") and assets.is_installed("minilm-l6")):
        pytest.skip("assets not installed: run `cepe assets`")
    torch.manual_seed(0)
    return CepeForCausalLM.from_base("smollm2-135m", "minilm-l6", chunk_size=256, cross_attn_init="zero").eval()


def _ppl(model, ids, **kw):
    with torch.no_grad():
        return math.exp(model(ids, labels=ids, **kw).loss.item())


def test_zero_init_reproduces_smollm2_perplexity(real_model):
    tok = real_model.tokenizer
    ids = tok(TEXT, add_special_tokens=False, return_tensors="pt").input_ids
    base = _ppl(real_model.decoder, ids)
    context = real_model.encode_context([TEXT * 8, "An unrelated second document about sailing ships."])
    assert context.hidden_states.shape[1] >= 2 * 258  # several chunks of 256 + [CLS]/[SEP]
    with_ctx = _ppl(real_model, ids, context=context)
    assert with_ctx == pytest.approx(base, rel=1e-6)
    assert 2.0 < base < 30.0  # a real language model on plain English


def test_generate_with_multi_chunk_context(real_model):
    tok = real_model.tokenizer
    real_model.config.kv_policy = "cache"
    prompt = tok("Where did the caretaker sit?", add_special_tokens=False, return_tensors="pt").input_ids
    ctx_ids, ctx_mask = real_model.tokenize_context([TEXT * 6])
    assert ctx_ids.shape[1] >= 2
    out = real_model.generate(prompt, context_input_ids=ctx_ids, context_attention_mask=ctx_mask,
                              max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape[1] == prompt.shape[1] + 8 or tok.eos_token_id in out[0, prompt.shape[1]:].tolist()
    assert isinstance(tok.decode(out[0]), str)


def test_save_load_round_trip_on_real_model(tmp_path, real_model):
    real_model.save_pretrained(tmp_path)
    size = sum(p.stat().st_size for p in tmp_path.rglob("*.safetensors"))
    assert size < 200 * 2**20  # adapter only: no base decoder weights (SmolLM2 alone is 540 MB fp32)
    loaded = CepeForCausalLM.from_pretrained(tmp_path, decoder=real_model.decoder).eval()
    tok = real_model.tokenizer
    ids = tok(TEXT, add_special_tokens=False, return_tensors="pt").input_ids
    ctx = loaded.encode_context([TEXT])
    assert _ppl(loaded, ids, context=ctx) == pytest.approx(_ppl(real_model, ids, context=ctx), rel=1e-6)


def test_decoder_loads_from_gguf_file_with_same_weights(real_model):
    gguf = assets.gguf_path("smollm2-135m")
    if gguf is None:
        pytest.skip("GGUF not kept by this asset install")
    model = CepeForCausalLM.from_base(str(gguf), "minilm-l6", cross_attn_init="zero").eval()
    # same checkpoint: the base fingerprint matches the safetensors-converted decoder
    assert model.config.base_fingerprint == real_model.config.base_fingerprint
    ids = real_model.tokenizer(TEXT, add_special_tokens=False, return_tensors="pt").input_ids
    assert model.tokenizer(TEXT, add_special_tokens=False, return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, real_model(ids).logits, rtol=1e-4, atol=1e-4)
