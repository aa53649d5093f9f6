"""Prefill / scoring: the logits of the last D tokens of an L-token sequence, two ways.

CEPE: the first L - D tokens are context, split into chunks that the encoder reads in one batch;
the decoder reads the last D tokens and cross-attends to every encoded token.
Full attention: the base decoder reads all L tokens (no cache kept) and returns logits for the
last D. Both go through the library's model object (`model` and `model.decoder`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import CepeForCausalLM


@dataclass
class ScoringInputs:
    """One synthetic sequence of `total` tokens, cut the two ways.

    full_ids (1, total); decoder_ids (1, score) = its last `score` tokens; context_ids (1, N, chunk)
    the first total - score tokens in chunks (None when there is no context)."""

    full_ids: torch.Tensor
    decoder_ids: torch.Tensor
    context_ids: torch.Tensor | None
    context_mask: torch.Tensor | None

    @property
    def context_tokens(self) -> int:
        return 0 if self.context_mask is None else int(self.context_mask.sum())


def make_inputs(model: CepeForCausalLM, total: int, score: int, device, seed: int = 0) -> ScoringInputs:
    """Random token ids (speed does not depend on them; id 0-2 are left out as special tokens)."""
    if not 0 < score <= total:
        raise ValueError(f"score tokens ({score}) must be in 1..total length ({total})")
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.text_config.vocab_size
    full = torch.randint(3, vocab, (1, total), generator=g)
    context = total - score
    ctx_ids = ctx_mask = None
    if context:
        chunk = model.config.chunk_size
        n = -(-context // chunk)
        if model.encoder.vocab_size == vocab:  # same tokenizer: the context is literally the prefix
            flat = full[0, :context]
        else:  # e.g. a BERT encoder: its own ids, same count
            flat = torch.randint(3, model.encoder.vocab_size, (context,), generator=g)
        ctx_ids = torch.zeros(1, n * chunk, dtype=torch.long)
        ctx_mask = torch.zeros(1, n * chunk, dtype=torch.long)
        ctx_ids[0, :context], ctx_mask[0, :context] = flat, 1
        ctx_ids, ctx_mask = ctx_ids.view(1, n, chunk), ctx_mask.view(1, n, chunk)
        ctx_ids, ctx_mask = ctx_ids.to(device), ctx_mask.to(device)
    return ScoringInputs(full.to(device), full[:, total - score:].to(device), ctx_ids, ctx_mask)


@torch.no_grad()
def cepe_scores(model: CepeForCausalLM, inputs: ScoringInputs) -> torch.Tensor:
    """(1, D, V) logits: encode the context chunks, then the decoder over the last D tokens."""
    if inputs.context_ids is None:  # nothing to encode: CEPE is the plain decoder
        return model(inputs.decoder_ids, use_cache=False).logits
    return model(inputs.decoder_ids, context_input_ids=inputs.context_ids,
                 context_attention_mask=inputs.context_mask, use_cache=False).logits


@torch.no_grad()
def full_scores(model: CepeForCausalLM, inputs: ScoringInputs) -> torch.Tensor:
    """(1, D, V) logits of the base decoder over all L tokens (no cache kept: the least memory)."""
    d = inputs.decoder_ids.shape[1]
    return model.decoder(inputs.full_ids, use_cache=False, logits_to_keep=d).logits
