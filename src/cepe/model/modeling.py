"""`CepeForCausalLM`: a frozen Hugging Face decoder + a parallel context encoder + cross-attention."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel

from .absorbed import AbsorbedWeightsCache
from .adapter_io import (  # noqa: F401 (names importable from here, as before the split)
    ADAPTER_FILE,
    ADAPTER_INDEX,
    ENCODER_TOKENIZER_DIR,
    load_adapter_weights,
    load_pretrained,
    sampled_weights_hash,
    save_adapter,
    weights_fingerprint,
)
from .configuration import CepeConfig
from .context import ContextStates, chunk_specials, tokenize_documents
from .cross_attention import CrossAttention
from .cross_step import cross_attention_delta, cross_kv_cache_bytes, resolve_kv_policy
from .encoder import (ContextEncoder, DecoderDerivedEncoder, HFEncoder, build_encoder_from_config, encode_chunks,
                      set_activation_checkpointing)
from .encoder_compile import EncoderRunner
from .families import decoder_layers, family_of
from .layer_hooks import CONTEXT_KWARG, BoundContext, install_cross_attention_hooks


class CepeForCausalLM(PreTrainedModel, GenerationMixin):
    """A decoder-only LM extended with CEPE.

    Parameters live in three places: `decoder` (the base `*ForCausalLM`, frozen, keys unchanged),
    `encoder` (a `ContextEncoder`) and `cross_attn` (one `CrossAttention` per selected layer, keyed
    by layer index). Only `encoder` and `cross_attn` are saved by `save_pretrained`. `absorbed_weights`
    holds `cross_attn`'s absorbed projections for `kv_policy="absorbed"` (derived, never saved).

    Context enters as chunk ids `context_input_ids` (B, N, L) with `context_attention_mask`
    (B, N, L), or as an already encoded `context` (`ContextStates`, e.g. from `encode_context`).
    """

    config_class = CepeConfig
    main_input_name = "input_ids"
    base_model_prefix = "cepe"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(
        self,
        config: CepeConfig,
        decoder: nn.Module | None = None,
        encoder: ContextEncoder | None = None,
        encoder_tokenizer: Any = None,
        tokenizer: Any = None,
    ):
        super().__init__(config)
        if decoder is None:
            decoder = AutoModelForCausalLM.from_config(copy.deepcopy(config.text_config))
        self.decoder = decoder
        self.family = family_of(config.text_config.model_type)
        if encoder is None:
            if config.encoder_type == "decoder":
                encoder = DecoderDerivedEncoder.from_decoder(decoder, config.encoder_num_layers)
            else:
                encoder = build_encoder_from_config(config)
        self.encoder = encoder
        if config.chunk_size > encoder.max_positions:
            raise ValueError(
                f"chunk_size {config.chunk_size} exceeds the encoder's {encoder.max_positions} positions"
            )
        layers = decoder_layers(decoder)
        self.cross_attn = nn.ModuleDict(
            {
                str(i): CrossAttention.from_self_attention(
                    layers[i],
                    getattr(layers[i], self.family.query_norm),
                    encoder_hidden_size=encoder.hidden_size,
                    num_kv_heads=config.cross_attn_num_kv_heads,
                    init=config.cross_attn_init,
                )
                for i in config.selected_layers()
            }
        )
        self.encoder_tokenizer = encoder_tokenizer
        self.tokenizer = tokenizer
        self.encoder_runner = EncoderRunner(encoder)  # eager or compiled per pass (`config.encoder_compile`)
        self.absorbed_weights = AbsorbedWeightsCache()  # for kv_policy "absorbed"; re-absorbed when weights change
        install_cross_attention_hooks(self, layers, config.selected_layers(), self.family, self._cross_delta)
        self.freeze_base()
        if getattr(decoder, "generation_config", None) is not None:
            self.generation_config = decoder.generation_config
        self.post_init()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_base(
        cls,
        decoder: nn.Module | str,
        encoder: nn.Module | str | None = None,
        *,
        chunk_size: int = 256,
        cross_attn_init: str = "copy",
        cross_attn_layers: str | list[int] = "all",
        cross_attn_num_kv_heads: int | None = None,
        encoder_num_layers: int = 4,
        kv_policy: str = "recompute",
        encoder_frozen: str | None = None,
        dtype: torch.dtype | str | None = None,
        gguf_file: str | None = None,
        tokenizer: Any = None,
        encoder_tokenizer: Any = None,
    ) -> CepeForCausalLM:
        """Wrap a base decoder (instance, folder, GGUF or asset name like `smollm2-135m`) with a
        context encoder (instance, folder, asset name like `minilm-l6`, or None for the
        decoder-derived encoder) and freshly initialised cross-attention."""
        from .loading import load_decoder, load_encoder

        base_decoder = decoder if isinstance(decoder, str) else getattr(decoder, "name_or_path", None)
        if isinstance(decoder, str):
            decoder, tok = load_decoder(decoder, gguf_file=gguf_file, dtype=dtype)
            tokenizer = tokenizer or tok
        base_encoder = encoder if isinstance(encoder, str) else None
        enc_module = None
        enc_config = None
        if encoder is not None:
            if isinstance(encoder, str):
                enc_module, enc_tok = load_encoder(encoder)
                encoder_tokenizer = encoder_tokenizer or enc_tok
            elif isinstance(encoder, ContextEncoder):
                enc_module = encoder
            else:
                enc_module = HFEncoder(encoder)
            enc_config = enc_module.model.config
            base_encoder = base_encoder or getattr(enc_config, "name_or_path", None)
            ref = next(decoder.parameters())
            enc_module.to(device=ref.device)
        config = CepeConfig(
            # a copy: PreTrainedModel.__init__ rewrites sub-configs' attention settings, and the
            # decoder must keep its own (a None implementation silently drops the causal mask)
            text_config=copy.deepcopy(decoder.config),
            encoder_config=copy.deepcopy(enc_config),
            encoder_type="hf" if encoder is not None else "decoder",
            encoder_num_layers=encoder_num_layers,
            chunk_size=chunk_size,
            cross_attn_layers=cross_attn_layers,
            cross_attn_num_kv_heads=cross_attn_num_kv_heads,
            cross_attn_init=cross_attn_init,
            kv_policy=kv_policy,
            encoder_frozen=encoder_frozen,
            base_fingerprint=sampled_weights_hash(decoder),
            base_decoder=base_decoder,
            base_encoder=base_encoder,
        )
        if encoder is None:
            encoder_tokenizer = tokenizer
        return cls(config, decoder=decoder, encoder=enc_module, encoder_tokenizer=encoder_tokenizer,
                   tokenizer=tokenizer)

    def init_weights(self):
        """No-op: every part is initialised when built (decoder and encoder come pretrained,
        cross-attention from the self-attention it sits beside); a generic re-init would undo that."""

    def freeze_base(self) -> None:
        """Freeze every decoder parameter (the encoder's shared embeddings included), and the
        encoder parts named by `config.encoder_frozen`."""
        for p in self.decoder.parameters():
            p.requires_grad_(False)
        if self.config.encoder_frozen:
            self.freeze_encoder(self.config.encoder_frozen)

    def freeze_encoder(self, part: str = "embeddings") -> None:
        """Freeze the encoder's `"embeddings"` (large and generic: a 30K x 384 table for MiniLM)
        or `"all"` of it. Frozen encoder weights are not saved: they load from the base encoder."""
        if part not in ("embeddings", "all"):
            raise ValueError(f"freeze_encoder: part must be 'embeddings' or 'all', got {part!r}")
        for name, p in self.encoder.named_parameters():
            if part == "all" or "embed" in name:
                p.requires_grad_(False)
        self.config.encoder_frozen = part

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters CEPE adds: encoder and cross-attention (shared decoder tensors excluded)."""
        base_ids = {id(p) for p in self.decoder.parameters()}
        out = {}
        for name, p in self.named_parameters(remove_duplicate=False):
            if name.startswith(("encoder.", "cross_attn.")) and id(p) not in base_ids:
                out[name] = p
        for name, b in self.named_buffers():
            if name.startswith(("encoder.", "cross_attn.")) and b.is_floating_point() and "position_ids" not in name:
                out.setdefault(name, b)
        return out

    def adapter_parameters(self, include_encoder: bool = True) -> list[nn.Parameter]:
        """Trainable parameters to hand to an optimizer (frozen encoder parts excluded)."""
        prefixes = ("encoder.", "cross_attn.") if include_encoder else ("cross_attn.",)
        base_ids = {id(p) for p in self.decoder.parameters()}
        return [
            p for n, p in self.named_parameters()
            if n.startswith(prefixes) and id(p) not in base_ids and p.requires_grad
        ]

    def get_input_embeddings(self):
        return self.decoder.get_input_embeddings()

    def get_output_embeddings(self):
        return self.decoder.get_output_embeddings()

    def get_decoder(self):
        return self.decoder.get_decoder()

    # ------------------------------------------------------------------ cross-attention
    def _cross_delta(self, idx: int, h: torch.Tensor, ctx: ContextStates) -> torch.Tensor:
        """The hook each selected layer calls: (B, T, H) -> cross-attention delta (B, T, H)."""
        return cross_attention_delta(self.cross_attn[str(idx)], idx, h, ctx, config=self.config,
                                     policy=lambda: self._kv_policy(ctx), absorbed_weights=self.absorbed_weights)

    def _kv_policy(self, ctx: ContextStates) -> str:
        """This forward's key/value policy (`cross_step.resolve_kv_policy`)."""
        return resolve_kv_policy(self.config, list(self.cross_attn.values()), ctx, self.training)

    def cross_kv_cache_bytes(self, ctx: ContextStates) -> int:
        """Memory the `cache` policy would hold for this context: 2 x layers x B x Hkv x S x d."""
        return cross_kv_cache_bytes(list(self.cross_attn.values()), ctx)

    # ------------------------------------------------------------------ context
    def encode(self, context_input_ids: torch.Tensor,
               context_attention_mask: torch.Tensor | None = None) -> ContextStates:
        """Run the encoder over every chunk of the batch in one pass (or in slices of
        `config.encoder_chunks_per_pass` chunks, which bounds memory and gives the same states).

        context_input_ids, context_attention_mask: (B, N, L). Returns `ContextStates` with
        hidden_states (B, N*L, He). Chunks that are all padding are not run at all."""
        if self.encoder_runner.encoder is not self.encoder:  # the encoder was swapped after construction
            self.encoder_runner = EncoderRunner(self.encoder)
        mode = self.config.encoder_compile
        states, mask = encode_chunks(self.encoder, context_input_ids, context_attention_mask,
                                     self.config.encoder_chunks_per_pass,
                                     forward=lambda ids, m: self.encoder_runner(ids, m, mode))
        return ContextStates(states, mask, self.encoder_hash)

    def tokenize_context(
        self, contexts: list[str] | list[list[int]] | list[list[str]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Documents -> chunk tensors (B, N, L). A flat list of documents is one example; a list
        of lists is a batch. Documents are strings (tokenized with the encoder's tokenizer) or
        lists of encoder token ids; each is split into `chunk_size` chunks on its own."""
        if not contexts:
            raise ValueError("empty context: pass at least one document")
        first = contexts[0]
        batched = isinstance(first, (list, tuple)) and first and not isinstance(first[0], int)
        batch = contexts if batched else [contexts]
        return self.tokenize_context_batch(batch)

    def tokenize_context_batch(self, batch: list[list[str] | list[list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One list of documents per example (an example may have none) -> chunk tensors (B, N, L);
        examples with fewer chunks are padded with empty chunks, which the encoder skips."""
        return tokenize_documents(batch, self.encoder_tokenizer, self.config.chunk_size, self._chunk_specials())

    def _chunk_specials(self) -> tuple[list[int], list[int], int]:
        """Tokens around each chunk (e.g. BERT's [CLS] / [SEP]) and the padding id."""
        return chunk_specials(self.encoder_tokenizer, self.config.encoder_type)

    @torch.no_grad()
    def encode_context(self, contexts) -> ContextStates:
        """Encode documents once; pass the result as `context=` to `forward`/`generate` as often
        as needed, or `save` it for another process."""
        ids, mask = self.tokenize_context(contexts)
        return self.encode(ids.to(self.device), mask.to(self.device))

    @property
    def encoder_hash(self) -> str:
        """`enc-` + a hash of the encoder's weights, type and chunk size: what a `ContextStates`
        records, so that states from another encoder are refused."""
        extra = f"{self.config.encoder_type}:{self.config.chunk_size}"
        return "enc-" + sampled_weights_hash(self.encoder, extra=extra)[:16]

    @property
    def encoder_fingerprint(self) -> str:
        """Old name of `encoder_hash`."""
        return self.encoder_hash

    # ------------------------------------------------------------------ forward / generate
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        context_input_ids: torch.LongTensor | None = None,
        context_attention_mask: torch.Tensor | None = None,
        context: ContextStates | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ):
        """input_ids (B, T); context as chunk ids (B, N, L) or `ContextStates`. `position_ids` and
        any other keyword (cache, ...) go to the decoder unchanged; `position_ids` is named so that
        `generate` derives it from a left-padded attention mask. Returns the decoder's output."""
        if context is None and context_input_ids is not None:
            context = self.encode(context_input_ids, context_attention_mask)
        if context is not None:
            inputs = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
            context = self._prepare_context(context, inputs)
            # an argument of this call only: each decoder layer hands it to its cross-attention
            # (`layer_hooks`), and a checkpointed layer recomputed in backward gets it again
            kwargs[CONTEXT_KWARG] = BoundContext(self, context)
        return self.decoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels,
            logits_to_keep=logits_to_keep, **kwargs
        )

    def _prepare_context(self, ctx: ContextStates, inputs: torch.Tensor | None) -> ContextStates:
        # hashing the encoder's weights costs hundreds of small device reads: check a context once
        # per model, not at every decoding step
        if ctx.encoder_hash is not None and not self.training and ctx.cross_cache.verified_by != id(self):
            if ctx.encoder_hash != self.encoder_hash:
                raise ValueError(
                    f"context was encoded by another encoder ({ctx.encoder_hash}, this model: {self.encoder_hash})"
                )
            ctx.cross_cache.verified_by = id(self)
        if ctx.hidden_states.shape[-1] != self.encoder.hidden_size:
            raise ValueError(f"context width {ctx.hidden_states.shape[-1]} != encoder width {self.encoder.hidden_size}")
        dev = next(iter(self.cross_attn.values())).q_proj.weight.device
        if ctx.hidden_states.device != dev:
            ctx = ctx.to(dev)
        if inputs is not None and inputs.shape[0] != ctx.batch_size:
            ctx = ctx.expanded(inputs.shape[0])  # kept on the original: cached keys/values survive decoding steps
        return ctx

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, *, decoder: bool = True,
                                      encoder: bool = False):
        """Recompute layer activations in the backward pass: the decoder's layers, and with `encoder=True`
        the encoder's (its activations grow with the context tokens: 16 x 64K a batch did not fit an H200)."""
        if decoder:
            set_activation_checkpointing(self.decoder, True, gradient_checkpointing_kwargs)
        if encoder:
            enc = self._checkpointable()[1:]
            if not enc:
                raise ValueError(f"encoder checkpointing: {type(self.encoder).__name__} holds no transformers "
                                 "model whose layers can be recomputed")
            set_activation_checkpointing(enc[0], True, gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self):
        for m in self._checkpointable():
            if m.is_gradient_checkpointing:
                set_activation_checkpointing(m, False)

    def _checkpointable(self) -> list[nn.Module]:
        """The transformers models whose layers can be checkpointed: the decoder, and the encoder's."""
        enc = getattr(self.encoder, "model", None)
        return [self.decoder] + ([enc] if isinstance(enc, PreTrainedModel) else [])

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(m.is_gradient_checkpointing for m in self._checkpointable())

    @torch.no_grad()
    def generate(self, input_ids=None, context_input_ids=None, context_attention_mask=None, context=None, **kwargs):
        """`transformers` generation with the context encoded once per call (or never, given
        `context=`). Cross-attention keys/values follow `config.kv_policy`."""
        if context is None and context_input_ids is not None:
            mask = None if context_attention_mask is None else context_attention_mask.to(self.device)
            context = self.encode(context_input_ids.to(self.device), mask)
        if context is not None:
            # a fresh cross-attention cache for this call
            context = ContextStates(context.hidden_states, context.attention_mask, context.encoder_hash)
            kwargs["context"] = context
        return super().generate(input_ids, **kwargs)

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_size: int = 16 * 2**20,
                        dtype: torch.dtype | None = None, weight_format: str = "float", **_: Any) -> None:
        """Write config, adapter weights (safetensors, sharded above `max_shard_size` bytes) and
        the encoder tokenizer. The base decoder's weights are never written. `weight_format="int8"`
        stores weight matrices in 8 bits with a scale per row (loading restores floats)."""
        save_adapter(self, save_directory, max_shard_size=max_shard_size, dtype=dtype, weight_format=weight_format)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *args,
        decoder: nn.Module | str | None = None,
        encoder: nn.Module | str | None = None,
        dtype: torch.dtype | str | None = None,
        gguf_file: str | None = None,
        tokenizer: Any = None,
        check_base: bool = True,
        **kwargs,
    ) -> CepeForCausalLM:
        """Load an adapter folder onto its base decoder (instance, path, or the provenance
        recorded in the config). Refuses a decoder whose weights differ from the one trained on.
        Keyword arguments override the run-time settings (`RUNTIME_SETTINGS`: `kv_policy`,
        `kv_cache_budget_bytes`, `cross_attn_length_scaling`, `encoder_chunks_per_pass`, `absorbed_states`,
        `encoder_compile`), validated; any other keyword is an error."""
        return load_pretrained(cls, pretrained_model_name_or_path, decoder=decoder, encoder=encoder, dtype=dtype,
                               gguf_file=gguf_file, tokenizer=tokenizer, check_base=check_base, **kwargs)

    def load_adapter_weights(self, folder: str | os.PathLike, fresh: Callable[[str], bool] | None = None) -> None:
        """Copy an adapter folder's tensors into this model (checked: names, shapes, frozen base);
        tensors for which `fresh(name)` is true may be absent and keep their values."""
        load_adapter_weights(self, folder, fresh)
