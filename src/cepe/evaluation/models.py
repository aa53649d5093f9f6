"""Load what an evaluation runs on: a CEPE model (trained adapter or fresh init) and its base decoder."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..model.loading import DECODER_DERIVED, DEFAULT_DECODER, DEFAULT_ENCODER


@dataclass
class EvalModel:
    """`cepe` is None when only a base decoder was asked for (baselines only)."""

    decoder: nn.Module
    tokenizer: Any
    cepe: Any = None
    description: dict = field(default_factory=dict)
    others: dict = field(default_factory=dict)  # name -> more CEPE models on the same decoder

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        for value in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
            if value is not None:
                return int(value)
        return 0

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device


def load_eval_model(
    decoder: str | None = None,
    encoder: str | None = DEFAULT_ENCODER,
    adapter: str | None = None,
    init: str | None = None,
    chunk_size: int = 256,
    device: str = "cpu",
    dtype: str | None = None,
    encoder_layers: int = 4,
) -> EvalModel:
    """`adapter`: a trained adapter folder (or `released`), on `decoder` or else the base decoder
    the adapter records; `init`: `zero` | `copy` builds an untrained CEPE model; neither: the base
    decoder alone. `decoder` defaults to SmolLM2-135M-Instruct; `encoder="decoder"`: the
    decoder-derived encoder. CEPE models come from the one loader, `model.loading.load_model`."""
    from ..model.loading import adapter_and_init, dtype_name, encoder_name, load_decoder, load_model

    dtype, encoder = dtype_name(dtype), encoder_name(encoder)
    desc = {"decoder": decoder or DEFAULT_DECODER, "encoder": encoder, "adapter": adapter, "init": init,
            "chunk_size": chunk_size, "dtype": dtype or "float32"}
    if adapter is None and init is None:
        base, tok = load_decoder(desc["decoder"], dtype=dtype)
        if tok is None:
            raise ValueError(f"{desc['decoder']}: no tokenizer found next to the decoder")
        return EvalModel(base.to(device).eval(), tok, None, desc)
    adapter, init = adapter_and_init(adapter, init)
    desc.update(adapter=adapter, init=init)
    if adapter is not None:
        # the encoder is the adapter's own (eval's --encoder is for --init only)
        model = load_model(decoder, None, adapter, dtype=dtype, device=device)
        cfg = model.config
        desc.update(decoder=decoder or cfg.base_decoder, chunk_size=cfg.chunk_size,
                    encoder=cfg.base_encoder if cfg.encoder_type == "hf" else DECODER_DERIVED)
    else:
        model = load_model(desc["decoder"], encoder, init=init, dtype=dtype, device=device, chunk_size=chunk_size,
                           encoder_num_layers=encoder_layers)
    if model.tokenizer is None:
        raise ValueError(f"{desc['decoder']}: no tokenizer found next to the decoder")
    return EvalModel(model.decoder, model.tokenizer, model, desc)


def add_adapter(em: EvalModel, name: str, adapter: str) -> None:
    """Load another trained adapter onto `em`'s very decoder (no second copy: each CEPE model
    hooks the shared layers and acts only while it holds a context), as method `name`."""
    from ..model import CepeForCausalLM

    if name in em.others or name == "cepe":
        raise ValueError(f"adapter name {name!r} is taken")
    dtype = next(em.decoder.parameters()).dtype
    model = CepeForCausalLM.from_pretrained(adapter, decoder=em.decoder, tokenizer=em.tokenizer)
    em.others[name] = model.to(device=em.device, dtype=dtype).eval()
    em.description.setdefault("compare_adapters", {})[name] = adapter
