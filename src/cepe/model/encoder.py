"""Context encoders: read context chunks independently and bidirectionally, all chunks in one batch."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig


class ContextEncoder(nn.Module):
    """Common interface: (N, L) chunk ids + mask -> (N, L, He) states.

    `max_positions` is the longest chunk (special tokens included) the encoder can read;
    `vocab_size` bounds valid ids.
    """

    max_positions: int
    vocab_size: int
    hidden_size: int

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class HFEncoder(ContextEncoder):
    """Any bidirectional `AutoModel` encoder (BERT, MiniLM, RoBERTa, MPNet): its last hidden states."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        cfg = model.config
        # RoBERTa-style position ids start after the padding index
        offset = (
            (getattr(cfg, "pad_token_id", 0) or 0) + 1
            if cfg.model_type in ("roberta", "xlm-roberta", "camembert", "mpnet")
            else 0
        )
        self.max_positions = cfg.max_position_embeddings - offset
        self.vocab_size = cfg.vocab_size
        self.hidden_size = cfg.hidden_size

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> HFEncoder:
        return cls(
            AutoModel.from_config(config, add_pooling_layer=False)
            if _has_pooler(config)
            else AutoModel.from_config(config)
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _has_pooler(config: PretrainedConfig) -> bool:
    return config.model_type in ("bert", "roberta", "xlm-roberta", "camembert", "mpnet")


class DecoderDerivedEncoder(ContextEncoder):
    """The first k layers of the base decoder, copied and run bidirectionally over each chunk.

    Shares the decoder's tokenizer and (frozen) token embeddings; the copied layers and a final
    norm are trainable. Built from the decoder's own `AutoModel` class with k layers, so rotary
    positions, norms and per-family details come from the installed transformers.
    """

    def __init__(self, decoder_config: PretrainedConfig, num_layers: int, embed_tokens: nn.Module | None = None):
        super().__init__()
        cfg = copy.deepcopy(decoder_config)
        cfg.num_hidden_layers = num_layers
        if getattr(cfg, "layer_types", None) is not None:
            cfg.layer_types = list(cfg.layer_types)[:num_layers]
        cfg.use_cache = False
        self.model = AutoModel.from_config(cfg)
        if embed_tokens is not None:
            # share, do not copy: the embeddings stay the decoder's frozen ones
            self.model.embed_tokens = embed_tokens
        self.max_positions = getattr(cfg, "max_position_embeddings", 2048)
        self.vocab_size = cfg.vocab_size
        self.hidden_size = cfg.hidden_size

    @classmethod
    def from_decoder(cls, decoder: nn.Module, num_layers: int) -> DecoderDerivedEncoder:
        inner = decoder.get_decoder()
        enc = cls(decoder.config, num_layers, embed_tokens=inner.embed_tokens)
        src = {k: v for k, v in inner.state_dict().items() if not k.startswith("embed_tokens.")}
        keep = {k: v for k, v in src.items() if not k.startswith("layers.") or int(k.split(".")[1]) < num_layers}
        missing, unexpected = enc.model.load_state_dict(keep, strict=False)
        missing = [k for k in missing if not k.startswith("embed_tokens.")]
        if missing or unexpected:
            raise RuntimeError(f"decoder-derived encoder: missing {missing}, unexpected {unexpected}")
        ref = next(inner.parameters())
        enc.to(device=ref.device, dtype=ref.dtype)
        return enc

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        n, length = input_ids.shape
        emb_dtype = self.model.embed_tokens.weight.dtype
        keep = attention_mask.bool()
        # bidirectional within a chunk: every real token sees every real token; additive float
        # mask (0 / min) works with eager and SDPA attention alike and is passed through as-is
        bias = torch.zeros((n, 1, length, length), dtype=emb_dtype, device=input_ids.device)
        bias.masked_fill_(~keep[:, None, None, :], torch.finfo(emb_dtype).min)
        return self.model(input_ids=input_ids, attention_mask=bias, use_cache=False).last_hidden_state


def set_activation_checkpointing(model: nn.Module, enabled: bool, kwargs: dict | None = None) -> None:
    """Turn a transformers model's per-layer activation checkpointing on or off, under either name
    (`activation_checkpointing_*` from transformers 5.2x, `gradient_checkpointing_*` before).
    Non-reentrant by default: the frozen embeddings' outputs need no grad."""
    if enabled:
        kwargs = {"use_reentrant": False, **(kwargs or {})}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def encode_chunks(encoder: ContextEncoder, context_input_ids: torch.Tensor, context_attention_mask: torch.Tensor | None,
                  chunks_per_pass: int | None = None,
                  forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `encoder` over every chunk of the batch in one pass (or in slices of `chunks_per_pass`
    chunks, which bounds memory and gives the same states); chunks that are all padding are not run.
    `forward` (ids (n, L), mask (n, L)) -> (n, L, He) runs a pass instead of `encoder` itself
    (e.g. compiled: `cepe.model.encoder_compile`).

    context_input_ids, context_attention_mask: (B, N, L) (or (N, L) for one example). Returns the
    states (B, N*L, He) and the mask (B, N*L) bool, chunks laid end to end."""
    if context_input_ids.dim() == 2:
        context_input_ids = context_input_ids[None]
        if context_attention_mask is not None:
            context_attention_mask = context_attention_mask[None]
    if context_input_ids.dim() != 3:
        raise ValueError(
            f"context_input_ids must be (batch, n_chunks, chunk_len), got {tuple(context_input_ids.shape)}"
        )
    b, n, length = context_input_ids.shape
    if context_attention_mask is None:
        context_attention_mask = torch.ones_like(context_input_ids)
    if context_attention_mask.shape != context_input_ids.shape:
        raise ValueError("context_attention_mask must have the shape of context_input_ids")
    if length > encoder.max_positions:
        raise ValueError(
            f"context chunks of {length} tokens exceed the encoder's {encoder.max_positions} positions"
        )
    mask = context_attention_mask.bool()
    real_ids = context_input_ids[mask]
    if real_ids.numel() and (int(real_ids.min()) < 0 or int(real_ids.max()) >= encoder.vocab_size):
        raise ValueError(
            f"context ids out of the encoder's vocabulary [0, {encoder.vocab_size}): "
            f"min {int(real_ids.min())}, max {int(real_ids.max())}"
        )
    flat_ids = context_input_ids.reshape(b * n, length)
    flat_mask = mask.reshape(b * n, length)
    live = flat_mask.any(dim=-1)
    enc_param = next(encoder.parameters())
    out = torch.zeros((b * n, length, encoder.hidden_size), dtype=enc_param.dtype, device=enc_param.device)
    if live.any():
        ids = flat_ids[live].to(enc_param.device)
        live_mask = flat_mask[live].long().to(enc_param.device)
        # chunks are independent: encoding them in slices bounds activation memory, same result
        step = chunks_per_pass or len(ids)
        slices = range(0, len(ids), step)
        run = forward or encoder
        states = torch.cat([run(ids[i : i + step], live_mask[i : i + step]) for i in slices])
        out = out.index_put((live.nonzero().squeeze(-1).to(out.device),), states.to(out.dtype))
    return out.reshape(b, n * length, -1), mask.reshape(b, n * length).to(out.device)


def build_encoder_from_config(config) -> ContextEncoder:
    """Encoder with random weights from a `CepeConfig` (weights are loaded afterwards)."""
    if config.encoder_type == "hf":
        return HFEncoder.from_config(config.encoder_config)
    raise ValueError("the decoder-derived encoder is built from a decoder instance")


def load_hf_encoder(path: str, dtype: torch.dtype | None = None) -> HFEncoder:
    cfg = AutoConfig.from_pretrained(path)
    kwargs = {"add_pooling_layer": False} if _has_pooler(cfg) else {}
    model = (
        AutoModel.from_pretrained(path, dtype=dtype, **kwargs) if dtype else AutoModel.from_pretrained(path, **kwargs)
    )
    return HFEncoder(model)
