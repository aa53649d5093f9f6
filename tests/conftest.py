"""Tiny random models for fast CPU tests."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import (AutoModelForCausalLM, BertConfig, BertModel, Gemma3TextConfig, LlamaConfig, MistralConfig,
                          Qwen2Config)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

VOCAB = 96


def tiny_decoder_config(family: str = "llama", **overrides):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        return MistralConfig(sliding_window=None, **common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "gemma3":
        return Gemma3TextConfig(head_dim=8, sliding_window=64, query_pre_attn_scalar=8, **common)
    raise ValueError(family)


FAMILIES = ["llama", "mistral", "qwen2", "gemma3"]


def tiny_decoder(family: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = tiny_decoder_config(family, **overrides)
    cfg._attn_implementation = "eager" if family == "gemma3" else "sdpa"
    return AutoModelForCausalLM.from_config(cfg).eval()


def tiny_bert(seed: int = 1, hidden: int = 24, vocab: int = 80):
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=64, pad_token_id=0,
    )
    return BertModel(cfg, add_pooling_layer=False).eval()


def tiny_cepe(family: str = "llama", encoder: str = "bert", chunk_size: int = 8, init: str = "copy", **kw):
    from cepe import CepeForCausalLM

    dec = tiny_decoder(family)
    enc = tiny_bert() if encoder == "bert" else None
    model = CepeForCausalLM.from_base(dec, enc, chunk_size=chunk_size, cross_attn_init=init, encoder_num_layers=2, **kw)
    return model.eval()


@pytest.fixture
def llama_cepe():
    return tiny_cepe("llama")


def rand_ids(b=2, t=10, seed=0):
    """(b, t) random decoder ids of the tiny models' vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 90, (b, t), generator=g)


def rand_context(b=2, n=3, length=10, seed=1, vocab=60):
    """(b, n, length) random context ids: n chunks per example."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (b, n, length), generator=g)
