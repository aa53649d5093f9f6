"""The adapter released in weights/: it loads onto SmolLM2, its context lowers perplexity on
text it never trained on (Persuasion is held out of training), and it finds a pass key that only
the encoder reads."""

from __future__ import annotations

import math
from importlib import resources

import pytest
import torch

from cepe import CepeForCausalLM, assets
from cepe.demo import bundled_document, window_perplexity
from cepe.release import released_adapter_path

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def released():
    if not assets.is_installed("smollm2-135m"):
        pytest.skip("assets not installed: run `cepe assets`")
    return CepeForCausalLM.from_pretrained(released_adapter_path(), decoder="smollm2-135m").eval()


def test_released_adapter_is_small_and_safetensors_only():
    folder = released_adapter_path()
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 60 * 2**20
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert weights and all(p.stat().st_size < 16 * 2**20 for p in weights)
    assert not any(p.suffix in (".bin", ".pt", ".pth", ".pkl") for p in files)


def test_context_lowers_perplexity_on_held_out_passage(released):
    torch.manual_seed(0)
    ids = released.tokenizer(bundled_document(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    ids = ids[:4096]  # keep CI fast: 512-token window, 3,584 tokens of context
    alone = window_perplexity(released, ids, window=512, scored=256, context_tokens=0)
    with_context = window_perplexity(released, ids, window=512, scored=256, context_tokens=3584)
    assert math.isfinite(with_context)
    assert with_context < 0.95 * alone, (alone, with_context)


def test_context_lowers_perplexity_on_prose_unlike_austen(released):
    # Moby-Dick, chapters 1-3: held out of every training mix (issue 15's held-out split), and
    # neither Austen nor Python
    torch.manual_seed(0)
    text = resources.files("cepe").joinpath("resources/moby_dick_ch1-3.txt").read_text(encoding="utf-8")
    ids = released.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0][:4096]
    alone = window_perplexity(released, ids, window=512, scored=256, context_tokens=0)
    with_context = window_perplexity(released, ids, window=512, scored=256, context_tokens=3584)
    assert with_context < 0.98 * alone, (alone, with_context)


def test_released_adapter_refuses_another_base_decoder(tmp_path):
    from conftest import tiny_decoder

    with pytest.raises(ValueError):
        CepeForCausalLM.from_pretrained(released_adapter_path(), decoder=tiny_decoder("llama"))


def test_pass_key_in_the_encoder_is_retrieved(released):
    # the key sits in the encoder's part of 4K tokens of Moby-Dick (natural filler); the decoder
    # window (256 tokens) holds only the question, so the truncated decoder cannot know it
    from cepe.evaluation.methods import build_methods
    from cepe.evaluation.tasks import passkey

    text = resources.files("cepe").joinpath("resources/moby_dick_ch1-3.txt").read_text(encoding="utf-8")
    settings = passkey.PasskeySettings(lengths=[4096], depths=[0.1, 0.3, 0.5, 0.7, 0.9], trials=1,
                                       decoder_tokens=256, seed=1)
    methods = build_methods(["cepe", "truncated"], released, pad_id=released.tokenizer.pad_token_id or 0)
    out = passkey.run(methods, settings, released.tokenizer, filler=text, progress=False)
    assert out["methods"]["cepe"]["accuracy"] >= 0.8, out["samples"]
    assert out["methods"]["truncated"]["accuracy"] == 0.0, out["samples"]
