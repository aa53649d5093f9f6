"""`CrossAttentionCache`: what cross-attention derives from one encoded context, kept while the
context is reused (decoding steps, prompts sharing a document, a server's hot documents)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .cross_attention import ContextBias

if TYPE_CHECKING:
    from .absorbed_fp8 import Fp8States
    from .context import ContextStates

_UNSET = object()


class CrossAttentionCache:
    """Per-context cross-attention state, filled lazily by the model.

    - keys/values per decoder layer index, each (B, Hkv, S, d): kept only under the `cache` policy
      (or `auto` within its budget). `policy` names the policy that served the context: "cache"
      (these keys/values), "absorbed" (none kept: steps read the encoder states), or None
      (`recompute`, or not used yet); `auto` records the one it chose.
    - the key padding mask (B, S) bool, or None when no key is padding: decided once per context,
      so a decoding step needs no device sync and SDPA may take its mask-free fused kernel.
    - the length-scaling logit scale (B,) per trained length L (None: no row is longer than L);
      keyed by L so a changed setting is never served a stale factor.
    - `ContextBias` (the mask and logit scale in the attention's forms) per trained length and dtype.
    - expansions of the context to a larger batch (beams, one document for many prompts), by batch
      size, so their cached keys/values survive from one decoding step to the next.
    - the encoder states packed for fp8 decoding (`absorbed_states="fp8"`), made once per context.
    - `verified_by`: id of the model that checked the encoder hash (once per model, not per step).
    """

    def __init__(self) -> None:
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.policy: str | None = None
        self._key_mask: torch.Tensor | None | object = _UNSET
        self._every_row_has_keys = True  # decided with the key mask
        self._logit_scales: dict[int, torch.Tensor | None] = {}
        self._biases: dict[tuple[int | None, torch.dtype], ContextBias] = {}
        self._expansions: dict[int, ContextStates] = {}
        self._fp8: Fp8States | None = None
        self.verified_by: int | None = None

    # ------------------------------------------------------------------ keys / values
    def keys_values(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cached (key, value) of decoder layer `layer`, each (B, Hkv, S, d), or None."""
        return self._kv.get(layer)

    def store(self, layer: int, key: torch.Tensor, value: torch.Tensor, policy: str) -> None:
        """Keep layer `layer`'s projected key/value (B, Hkv, S, d), filled under `policy`."""
        self._kv[layer] = (key, value)
        self.policy = policy

    @property
    def layers(self) -> list[int]:
        """Decoder layers whose keys/values are held."""
        return sorted(self._kv)

    @property
    def filled(self) -> bool:
        return bool(self._kv)

    # ------------------------------------------------------------------ decided once per context
    def key_mask(self, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """attention_mask (B, S) bool -> itself, or None when nothing is padding."""
        if self._key_mask is _UNSET:
            # one device read (a synchronisation on a GPU) per context for both facts
            no_padding, self._every_row_has_keys = torch.stack(
                [attention_mask.all(), attention_mask.any(-1).all()]).tolist()
            self._key_mask = None if no_padding else attention_mask
        return self._key_mask

    def logit_scale(self, attention_mask: torch.Tensor, trained_length: int) -> torch.Tensor | None:
        """(B,) log(L) / log(n) for rows with n > L = `trained_length` real context tokens (1
        elsewhere), or None when no row is longer than L."""
        if trained_length not in self._logit_scales:
            n = attention_mask.sum(-1).float()
            scale = (math.log(trained_length) / n.clamp(min=2).log()).clamp(max=1.0)
            self._logit_scales[trained_length] = scale if bool((n > trained_length).any()) else None
        return self._logit_scales[trained_length]

    def bias(self, attention_mask: torch.Tensor, trained_length: int | None, dtype: torch.dtype) -> ContextBias:
        """`key_mask` and `logit_scale` (None when `trained_length` is None) as a `ContextBias` in
        `dtype`, built the first time: every layer of every step then reuses its tensors."""
        key = (trained_length, dtype)
        if key not in self._biases:
            scale = None if trained_length is None else self.logit_scale(attention_mask, trained_length)
            mask = self.key_mask(attention_mask)
            self._biases[key] = ContextBias.build(mask, scale, dtype, every_row_has_keys=self._every_row_has_keys)
        return self._biases[key]

    def pin_bias(self, trained_length: int | None, dtype: torch.dtype, bias: ContextBias) -> None:
        """Serve `bias` for (`trained_length`, `dtype`) from now on instead of building it from the
        mask: for a context whose rows change in place, its owner refreshing the bias tensors (the
        server's captured decoding steps, whose graphs read fixed tensors)."""
        self._biases[(trained_length, dtype)] = bias

    def expansion(self, batch_size: int, build: Callable[[], ContextStates]) -> ContextStates:
        """The context expanded to `batch_size` rows, built by `build()` the first time."""
        if batch_size not in self._expansions:
            self._expansions[batch_size] = build()
        return self._expansions[batch_size]

    def fp8_states(self, states: torch.Tensor) -> Fp8States:
        """`states` (B, S, He) packed for `absorbed_fp8.attend_fp8`, packed on the first call only."""
        if self._fp8 is None:
            from .absorbed_fp8 import pack_fp8

            self._fp8 = pack_fp8(states)
        return self._fp8

    # ------------------------------------------------------------------ accounting
    def nbytes(self) -> int:
        """Device bytes this cache holds: keys/values, fp8 states, logit scales, biases and expanded contexts (their
        states and caches). The key mask is the context's own attention mask, not a copy."""
        tensors = [t for kv in self._kv.values() for t in kv] + [
            s for s in self._logit_scales.values() if s is not None
        ] + [t for b in self._biases.values() for t in b.tensors()]
        held = sum(t.numel() * t.element_size() for t in tensors) + (self._fp8.nbytes if self._fp8 is not None else 0)
        return held + sum(e.nbytes() for e in self._expansions.values())

    def clear(self) -> None:
        self.__init__()
