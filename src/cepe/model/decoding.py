"""The one decoding loop: left padding, positions from the attention mask, the decoder's cache,
prefill and step, and per-row sampling. Evaluation (greedy continuations), serving (sampled
completions) and benchmarks (timed greedy decoding) all decode through it.

Works for a plain `*ForCausalLM` and for `CepeForCausalLM` alike: anything else the model takes
(`context=` for CEPE) goes in `forward_kwargs` and is passed at every step.

State is split so that rows can join and leave between steps (continuous batching): a `Batch`
holds only what the rows share (the cache, the attention mask, the next positions); each row's own
state is a `Row` (its prompt, `Sampler`, stop ids, token limit, tokens so far). `Batch.keep(indices)`
drops rows between steps; `Batch.join(other)` appends rows prefilled in a `Batch` of their own.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

SEED_MODULUS = 2**64  # torch generators take seeds in [-2**63, 2**64): any other integer is folded into it


def cache_keyword(model: nn.Module) -> str:
    """The forward's cache argument: `cache` (transformers >= 5.2x) or `past_key_values`. A CEPE
    model passes it through to its decoder, so the decoder's signature decides."""
    return _cache_keyword(type(_inner_decoder(model)))


@functools.cache
def _cache_keyword(cls: type) -> str:  # once per class: decoding steps must not pay for `inspect`
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def _inner_decoder(model: nn.Module) -> nn.Module:
    decoder = getattr(model, "decoder", None)  # CepeForCausalLM wraps its decoder
    return decoder if isinstance(decoder, nn.Module) and hasattr(decoder, "config") else model


def new_cache(model: nn.Module) -> DynamicCache:
    """An empty `DynamicCache` for the (inner) decoder, the very one its forward would create."""
    return DynamicCache(config=_inner_decoder(model).config)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids -> (B, T) ids and mask, padded on the left so every row ends at T."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) attention mask -> (B, T) position ids: each row restarts at 0 on its first real
    token (left padding); padding positions get 0, as in `generate`."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def forward(model: nn.Module, ids: torch.Tensor, cache=None, logits_to_keep: int = 1, **kwargs):
    """One cached forward: `ids` (B, T) after what `cache` holds; the cache keyword as this
    transformers version spells it. Other keywords (mask, positions, `context`) go through."""
    if cache is not None:
        kwargs[cache_keyword(model)] = cache
    return model(input_ids=ids, use_cache=True, logits_to_keep=logits_to_keep, **kwargs)


# ------------------------------------------------------------------ sampling
@dataclass(frozen=True)
class SamplingParams:
    """One row's sampling: temperature 0 is greedy (argmax); otherwise temperature, then top-k
    (0: off), then top-p (1: off). `seed` None draws a fresh seed."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams()


class Sampler:
    """Picks one row's next token from its logits, with its own random generator, so a seeded
    row samples the same tokens whatever else shares its batch."""

    def __init__(self, params: SamplingParams = GREEDY):
        self.params = params
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator()
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed % SEED_MODULUS)

    def __call__(self, logits: torch.Tensor) -> int:
        """logits (V,) -> the next token id."""
        p = self.params
        if p.greedy:
            return int(logits.argmax())
        logits = logits.float().cpu()  # the generator lives on the CPU: same draws on any device
        scaled = logits / p.temperature
        if not torch.isfinite(scaled[torch.isfinite(logits)]).all():
            # a tiny temperature overflows (or underflows to 0 in float32): subtract the max first
            # (every finite entry <= 0) and divide in float64, where any positive Python float is
            # nonzero, so the distribution tends to argmax instead of turning into NaN
            scaled = (logits.double() - logits.max()) / p.temperature
        if 0 < p.top_k < scaled.numel():
            kth = scaled.topk(p.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < p.top_p  # the smallest prefix reaching top_p
            keep[0] = True
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=self.generator)[0])


def pick(logits: torch.Tensor, samplers: list[Sampler | None]) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,): argmax for greedy rows and rows without a sampler
    (finished ones), each other row by its own `Sampler`."""
    tokens = logits.argmax(-1)
    sampled = [i for i, s in enumerate(samplers) if s is not None and not s.params.greedy]
    if sampled:
        # the samplers draw on the CPU: one device-to-host copy of all their rows, and one copy
        # of their tokens back, not one synchronising transfer per row and direction
        rows = logits[sampled].float().cpu()
        picked = [samplers[i](rows[j]) for j, i in enumerate(sampled)]
        tokens[torch.tensor(sampled, device=tokens.device)] = torch.tensor(picked, device=tokens.device)
    return tokens


# ------------------------------------------------------------------ rows and batches
@dataclass
class Row:
    """One sequence's own state: prompt, sampling, stop ids, token limit, the tokens so far."""

    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams = GREEDY
    stop_ids: frozenset = frozenset()
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" once done

    def __post_init__(self):
        self.sampler = Sampler(self.sampling)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int) -> None:
        """Take the token picked for this row; a stop id ends the row without being kept."""
        if self.done:
            return
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return
        self.tokens.append(token)
        if len(self.tokens) >= self.max_new_tokens:
            self.finish_reason = "length"


class Batch:
    """What the rows of a batch share between steps: the decoder cache, the (B, T) attention mask
    and each row's next position (B, 1). `prefill` and `step` return (B, V) float32 logits of the
    next token."""

    def __init__(self, model: nn.Module, pad_id: int = 0, **forward_kwargs: Any):
        self.model, self.pad_id, self.kwargs = model, pad_id, forward_kwargs
        self.device = next(model.parameters()).device
        self.cache = self.mask = self.next_positions = None
        # each row's left padding columns, kept on the host: trimming and the step's mask need no
        # device read (a synchronisation on a GPU)
        self.pads: list[int] = []

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Run the left-padded prompts once, keeping their keys/values in a fresh cache."""
        ids, mask = left_pad(prompts, self.pad_id)
        self.pads = [ids.shape[1] - len(p) for p in prompts]
        ids, self.mask = ids.to(self.device), mask.to(self.device)
        pos = positions(self.mask)
        self.cache = new_cache(self.model)
        out = forward(self.model, ids, self.cache, attention_mask=self.mask, position_ids=pos, **self.kwargs)
        self.next_positions = pos[:, -1:] + 1
        return out.logits[:, -1].float()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (B,) and run it. Without padding the decoder gets no mask: it
        would find the all-ones mask needless itself, after reading it from the device."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=-1)
        mask = self.mask if any(self.pads) else None
        out = forward(self.model, tokens.view(-1, 1).to(self.device), self.cache, attention_mask=mask,
                      position_ids=self.next_positions, **self.kwargs)
        self.next_positions = self.next_positions + 1
        return out.logits[:, -1].float()

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows (e.g. drop finished ones). Per-row `forward_kwargs` (a batched
        CEPE context) must be selected by the caller."""
        index = torch.tensor(indices, dtype=torch.long, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask, self.next_positions = self.mask[index], self.next_positions[index]
        self.pads = [self.pads[i] for i in indices]
        self._trim()

    @property
    def size(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def length(self) -> int:
        """T: cached positions per row, padding included."""
        return 0 if self.mask is None else self.mask.shape[1]

    def join(self, other: Batch) -> None:
        """Append `other`'s rows (prefilled, or stepped, in a `Batch` of their own on the same
        model) after this batch's rows. Both caches and masks are left-padded to a common length
        and concatenated along the batch: a row's positions are its own (`next_positions`) and
        its padding columns are masked, so every row computes what it would alone. Per-row
        `forward_kwargs` (a batched CEPE context) must be joined by the caller."""
        if other.size == 0:
            return
        if self.size == 0:
            self.cache, self.mask, self.next_positions = other.cache, other.mask, other.next_positions
            self.pads = list(other.pads)
            return
        width = max(self.length, other.length)
        self.pads = [p + width - self.length for p in self.pads] + [p + width - other.length for p in other.pads]
        mine, theirs = self._layers(), other._layers()
        if len(mine) != len(theirs):
            raise ValueError(f"cannot join caches of {len(mine)} and {len(theirs)} layers")
        for a, b in zip(mine, theirs):
            for name in ("keys", "values"):  # (B, H, T, d) each
                ka, kb = getattr(a, name), getattr(b, name)
                ka = nn.functional.pad(ka, (0, 0, width - ka.shape[-2], 0))
                kb = nn.functional.pad(kb, (0, 0, width - kb.shape[-2], 0))
                setattr(a, name, torch.cat([ka, kb.to(ka.dtype)]))
        self.mask = torch.cat([nn.functional.pad(m, (width - m.shape[1], 0)) for m in (self.mask, other.mask)])
        self.next_positions = torch.cat([self.next_positions, other.next_positions])

    def _layers(self) -> list:
        """The cache's per-layer holders of `keys` / `values` (B, H, T, d); a sliding-window
        layer (which drops old positions) cannot be padded or joined."""
        layers = list(getattr(self.cache, "layers", []))
        for layer in layers:
            if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
                raise NotImplementedError(
                    f"joining batches needs full-attention cache layers, got {type(layer).__name__}"
                )
        return layers

    def _trim(self) -> None:
        """Drop leading columns that no row attends to (left padding of rows that have left)."""
        if self.size == 0:
            return
        first = min(self.pads)  # the first column some row attends to (none: keep all)
        if 0 < first < self.length:
            for layer in self._layers():
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self.mask = self.mask[:, first:]
            self.pads = [p - first for p in self.pads]


@torch.no_grad()
def decode(model: nn.Module, rows: list[Row], pad_id: int = 0,
           mix: Callable[[torch.Tensor], torch.Tensor] | None = None, **forward_kwargs: Any) -> list[Row]:
    """Decode `rows` together until each is done (stop id or its token limit). Finished rows are
    fed `pad_id` (as `generate` does) until the last row is done. `mix`: maps the (B, V) float32
    logits before picking (REPLUG mixes the distributions of a request's passes)."""
    batch = Batch(model, pad_id, **forward_kwargs)
    logits = batch.prefill([r.prompt for r in rows])
    for _ in range(max(r.max_new_tokens for r in rows)):
        if mix is not None:
            logits = mix(logits)
        tokens = pick(logits, [None if r.done else r.sampler for r in rows])
        for row, token in zip(rows, tokens.tolist()):
            row.push(token)
        if all(r.done for r in rows):
            break
        tokens = tokens.masked_fill(torch.tensor([r.done for r in rows], device=tokens.device), pad_id)
        logits = batch.step(tokens)
    return rows


def greedy(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, stop_ids=frozenset(), pad_id: int = 0,
           mix: Callable[[torch.Tensor], torch.Tensor] | None = None, **forward_kwargs: Any) -> list[list[int]]:
    """Greedy continuations of `prompts` (each cut before its first stop id), decoded together."""
    if max_new_tokens < 1:
        return [[] for _ in prompts]
    rows = [Row(list(p), max_new_tokens, stop_ids=frozenset(stop_ids)) for p in prompts]
    return [r.tokens for r in decode(model, rows, pad_id, mix=mix, **forward_kwargs)]
