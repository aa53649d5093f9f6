"""The one place that builds a CEPE model from a run's config."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, BertConfig, BertModel, LlamaConfig

from ..data.synthetic import vocab_needed
from ..data.tokenizer import byte_tokenizer
from ..model import CepeConfig, CepeForCausalLM
from ..model.configuration import apply_runtime_settings
from ..model.loading import DECODER_DERIVED, deprecated, encoder_name, load_decoder, load_model, resolve_adapter
from .config import RunConfig, TinyConfig


def tiny_decoder(t: TinyConfig, vocab_size: int, attn_implementation: str | None = None):
    """A small random Llama (frozen, so its random weights are a fixed function)."""
    torch.manual_seed(t.seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
        max_position_embeddings=t.max_positions, initializer_range=t.init_std,
        tie_word_embeddings=t.tie_word_embeddings, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    cfg._attn_implementation = attn_implementation or "sdpa"
    return AutoModelForCausalLM.from_config(cfg).eval()


def tiny_encoder(t: TinyConfig, vocab_size: int, chunk_len: int) -> BertModel:
    torch.manual_seed(t.seed + 1)
    cfg = BertConfig(
        vocab_size=vocab_size, hidden_size=t.encoder_hidden_size, num_hidden_layers=t.encoder_layers,
        num_attention_heads=t.encoder_heads, intermediate_size=2 * t.encoder_hidden_size,
        max_position_embeddings=max(64, chunk_len), hidden_dropout_prob=t.encoder_dropout,
        attention_probs_dropout_prob=t.encoder_dropout, pad_token_id=0,
    )
    return BertModel(cfg, add_pooling_layer=False).eval()


def build_model(cfg: RunConfig) -> CepeForCausalLM:
    """Decoder + encoder (by asset name, path, `tiny`, or `decoder` for the decoder-derived encoder),
    fresh cross-attention (through the one loader, `load_model`), then `model.init_adapter` weights
    if given."""
    m = cfg.model
    tokenizer = encoder_tokenizer = None
    if m.decoder == "tiny":
        tokenizer = None if cfg.data.is_synthetic else byte_tokenizer()
        vocab = m.tiny.vocab_size or (vocab_needed(cfg.data.synthetic) if cfg.data.is_synthetic else len(tokenizer))
        decoder = tiny_decoder(m.tiny, vocab, m.attn_implementation)
    else:
        decoder, tokenizer = load_decoder(m.decoder, dtype=m.dtype)
        if m.attn_implementation:
            decoder.set_attn_implementation(m.attn_implementation)
    encoder = encoder_name(m.encoder)
    if encoder is None:  # YAML null, the old spelling
        deprecated("model.encoder=null", f"model.encoder={DECODER_DERIVED}")
        encoder = DECODER_DERIVED
    derived = encoder == DECODER_DERIVED
    if encoder == "tiny":
        # shares the decoder's ids (synthetic task or byte tokenizer): one token store serves both
        encoder = tiny_encoder(m.tiny, decoder.config.vocab_size, m.chunk_size)
        encoder_tokenizer = tokenizer
    # dtype stays None: the decoder was loaded in model.dtype, the encoder and adapter train in fp32
    model = load_model(
        decoder, encoder, init=m.cross_attn_init, chunk_size=m.chunk_size, cross_attn_layers=m.cross_attn_layers,
        cross_attn_num_kv_heads=m.cross_attn_num_kv_heads, encoder_num_layers=m.encoder_num_layers,
        tokenizer=tokenizer, encoder_tokenizer=encoder_tokenizer, encoder_frozen=m.encoder_frozen,
    )
    apply_runtime_settings(model.config, {"cross_attn_topk": m.cross_attn_topk})  # validated
    if m.init_adapter:
        load_init_adapter(model, m.init_adapter)
    # trainable weights stay fp32 (AdamW on bf16 weights loses small updates); autocast does the rest
    for p in model.adapter_parameters():
        p.data = p.data.float()
    if not derived:
        model.encoder.float()  # frozen encoder parts too: one dtype inside the (small) encoder
    return model


def load_init_adapter(model: CepeForCausalLM, folder: str) -> None:
    """Start from an earlier stage's adapter; it must come from the same base decoder and shapes,
    except that this run may add cross-attention layers (`cross_attn_layers` a superset of the
    saved one's): the saved layers load, the new ones keep their fresh init. With
    `cross_attn_init: zero` the grown model then starts exactly where the saved adapter ended."""
    path = resolve_adapter(folder)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.init_adapter: {path}/config.json not found (not an adapter folder)")
    saved = CepeConfig.from_pretrained(str(path))
    if saved.base_fingerprint and saved.base_fingerprint != model.config.base_fingerprint:
        raise ValueError(f"model.init_adapter: {path} was trained on another base decoder ({saved.base_fingerprint})")
    for key in ("encoder_type", "chunk_size"):
        if getattr(saved, key) != getattr(model.config, key):
            raise ValueError(
                f"model.init_adapter: {path}/config.json has {key}={getattr(saved, key)!r}, "
                f"this run {getattr(model.config, key)!r}"
            )
    grown = grown_layers(model, folder)  # their tensors keep the fresh init
    model.load_adapter_weights(path, fresh=lambda k: k.startswith("cross_attn.") and int(k.split(".")[1]) in grown)


def grown_layers(model: CepeForCausalLM, folder: str | None) -> set[int]:
    """Decoder layers where `model` has cross-attention and the adapter in `folder` has none (empty
    without a folder). Refuses an adapter with layers the model lacks."""
    if not folder:
        return set()
    path = resolve_adapter(folder)
    old = set(CepeConfig.from_pretrained(str(path)).selected_layers())
    new = set(model.config.selected_layers())
    if not old <= new:
        raise ValueError(
            f"model.init_adapter: {path} has cross-attention in layers {sorted(old - new)} that this run "
            f"(cross_attn_layers={model.config.cross_attn_layers!r}) lacks: a run may add layers, not drop them"
        )
    return new - old


def describe(model: CepeForCausalLM) -> dict:
    """Parameter counts: the frozen decoder, the encoder, the cross-attention."""
    n = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
    base = {id(p) for p in model.decoder.parameters()}
    return {
        "decoder_params": n(model.decoder.parameters()),
        "encoder_params": n(p for p in model.encoder.parameters() if id(p) not in base),
        "cross_attn_params": n(model.cross_attn.parameters()),
        "cross_attn_layers": len(model.cross_attn),
        "chunk_size": model.config.chunk_size,
        "encoder_type": model.config.encoder_type,
    }
