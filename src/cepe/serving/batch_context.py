"""The contexts of a running batch under continuous batching: each row its own documents.

Rows join and leave between decoding steps, so the batch's CEPE context changes with them. A
`RowContexts` holds the rows' encoded contexts right-padded to a common width S (padding masked,
so cross-attention ignores it) together with their cross-attention keys/values, projected once
when the rows are prefilled. Joining and leaving select and concatenate these tensors; no context
is projected again. `context` hands the model a `ContextStates` whose key/value cache is already
filled, so its cross-attention reads the keys/values instead of projecting them.

Shapes: hidden (B, S, He), mask (B, S) bool, keys/values per cross-attention layer (B, Hkv, S, d).
A row without context has an all-padding mask (its cross-attention adds nothing); when no row
has any context, there is no context at all (S = 0, `context` is None).
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.context import ContextStates
from ..model.stored_states import cross_kv_bytes_per_token


def context_bytes_per_token(model) -> int:
    """Device bytes one context position costs a running batch: encoder state, mask, and the
    keys and values of every cross-attention layer."""
    blocks = list(model.cross_attn.values())
    kv = cross_kv_bytes_per_token(blocks, blocks[0].k_proj.weight.element_size())
    return kv + model.encoder.hidden_size * next(model.encoder.parameters()).element_size() + 1


class RowContexts:
    """Per-row contexts of a batch, right-padded into one `ContextStates` (see the module doc)."""

    def __init__(self, model, size: int, hidden: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                 kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None, encoder_hash: str | None = None):
        self.model, self.size = model, size
        self.hidden, self.mask, self.kv, self.encoder_hash = hidden, mask, kv or {}, encoder_hash
        self._context: ContextStates | None = None
        # per row, one past its last real context position, kept on the host: rows leaving then
        # need no device read (a synchronisation on a GPU) to find the columns still used
        self.ends = [0] * size if mask is None else _ends(mask)

    @classmethod
    @torch.no_grad()
    def build(cls, model, per_row: list[list[ContextStates]]) -> RowContexts:
        """Each row's documents (single-example `ContextStates`, possibly none) joined, padded,
        and their keys/values projected (one projection per layer for all rows)."""
        joined = [ContextStates.concat(list(docs)) if docs else None for docs in per_row]
        dev = next(iter(model.cross_attn.values())).q_proj.weight.device
        states = ContextStates.stack_padded(joined, dev)
        if states is None:
            return cls(model, len(per_row))
        kv = {int(idx): block.project_kv(states.hidden_states) for idx, block in model.cross_attn.items()}
        return cls(model, len(per_row), states.hidden_states, states.attention_mask, kv, states.encoder_hash)

    @property
    def width(self) -> int:
        """S: context positions per row, padding included."""
        return 0 if self.mask is None else self.mask.shape[1]

    @property
    def context(self) -> ContextStates | None:
        """The batch's context for the model, its keys/values cache filled (None: no context)."""
        if self.mask is None:
            return None
        if self._context is None:
            self._context = ContextStates(self.hidden, self.mask, self.encoder_hash)
            for layer, (k, v) in self.kv.items():  # the model reads these instead of projecting the states
                self._context.cross_cache.store(layer, k, v, policy="cache")
        return self._context

    def nbytes(self) -> int:
        tensors = [t for t in (self.hidden, self.mask) if t is not None] + [t for kv in self.kv.values() for t in kv]
        return sum(t.numel() * t.element_size() for t in tensors)

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows; drop trailing columns that were only the leavers' context."""
        self.size, self._context = len(indices), None
        self.ends = [self.ends[i] for i in indices]
        if self.mask is None:
            return
        width = max(self.ends, default=0)
        if width == 0:  # no row left with context
            self.hidden = self.mask = None
            self.kv = {}
            return
        index = torch.tensor(indices, dtype=torch.long, device=self.mask.device)
        self.mask, self.hidden = self.mask[index, :width], self.hidden[index, :width]
        self.kv = {layer: (k[index, :, :width], v[index, :, :width]) for layer, (k, v) in self.kv.items()}

    def join(self, other: RowContexts) -> None:
        """Append `other`'s rows, both sides right-padded to the wider context."""
        if other.size == 0:
            return
        ends = self.ends + other.ends
        if self.size == 0 or (self.mask is None and other.mask is None):
            size = self.size + other.size
            self.__dict__.update(other.__dict__)
            self.size, self.ends, self._context = size, ends, None
            return
        a, b = self._padded_parts(other), other._padded_parts(self)
        width = max(self.width, other.width)

        def pad(t, dim_from_end):  # right-pad dimension S to `width`
            spec = [0, 0] * dim_from_end + [0, width - t.shape[-1 - dim_from_end]]
            return nn.functional.pad(t, spec)

        self.hidden = torch.cat([pad(a[0], 1), pad(b[0], 1)])
        self.mask = torch.cat([pad(a[1], 0), pad(b[1], 0)])
        self.kv = {layer: tuple(torch.cat([pad(x, 1), pad(y, 1)]) for x, y in zip(a[2][layer], b[2][layer]))
                   for layer in a[2]}
        self.size += other.size
        self.ends = ends
        self.encoder_hash = self.encoder_hash or other.encoder_hash
        self._context = None

    def _padded_parts(self, like: RowContexts):
        """(hidden, mask, kv) of this side; a side without context gets one padding column
        shaped like `like`'s tensors."""
        if self.mask is not None:
            return self.hidden, self.mask, self.kv
        h = like.hidden.new_zeros((self.size, 1, like.hidden.shape[-1]))
        m = like.mask.new_zeros((self.size, 1))
        kv = {layer: tuple(t.new_zeros((self.size, t.shape[1], 1, t.shape[3])) for t in pair)
              for layer, pair in like.kv.items()}
        return h, m, kv


def _ends(mask: torch.Tensor) -> list[int]:
    """(B, S) bool mask -> per row, one past its last True column (0: none)."""
    columns = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (mask.long() * columns).amax(1).tolist() if mask.shape[1] else [0] * mask.shape[0]
