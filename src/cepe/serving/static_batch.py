"""The running batch of continuous batching in fixed buffers, so its decoding step can be captured.

A CUDA graph replays its kernels on the very tensors it was captured with. So here the running
batch lives in buffers allocated for a capacity -- R rows, C decoder columns, W context positions
-- and each step runs on a bucket of them: the first Rb rows (a power of two, at most
`--max-batch`), Cb columns and Wb context positions (`round_columns`: multiples of 256, coarser
past 2,048 so that a bucket pads at most a quarter), views of the same buffers. A graph captured
for a bucket stays valid as long as the capacity does (`serving/captured.py` captures and replays
them; on the CPU the same bucketed step runs eagerly).

Layout, shapes (per decoder layer) keys/values (R, Hkv, C, d), mask (R, C) bool, positions and
tokens (R, 1), logits (R, V) float32; per cross-attention layer keys/values (R, Hkv', W, d') with
the rows' `ContextBias` (key bias (R, 1, 1, W), row gate (R, 1, 1), query scale (R, 1, 1, 1)):
- Rows live in slots. A row that leaves frees its slot, nothing is copied; a row that joins takes
  the lowest free slot. Before a step, rows in slots past the row bucket move down (only they are
  copied), so a batch that shrank runs a smaller bucket.
- Decoder columns are shared, as in `decoding.Batch`: every row's latest token is in column T - 1,
  its left padding is masked, and a step writes column T for every row (a static cache has one
  write position). Newcomers' caches, prefilled by `decoding.Batch`, are copied in to end at
  column T; a newcomer with a longer prompt first shifts the running rows right. Leading columns
  no row attends to any more are dropped (one copy of the cache) when keeping them would need a
  larger column bucket.
- A row's context sits from position 0 of its own row; the rest is masked by its key bias.
Free slots hold finite values and always one unmasked column (the step's own), so they compute
finite values that no real row reads.

Memory: the capacity grows only when rows join and need more (new buffers, the live rows copied,
captured graphs dropped), to what admission counted (`footprint`) or, where that fits the budget
too, to the larger of that and the old capacity in each dimension; so the buffers never hold more
than `--batch-memory-mb`. While they are replaced, old and new coexist for a moment.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from transformers import StaticCache

from ..model.cross_attention import ContextBias
from ..model.cross_cache import CrossAttentionCache

COLUMN_STEP = 256  # decoder columns and context positions are bucketed in multiples of this (or coarser)


class Shape(NamedTuple):
    """Rows, decoder columns, context positions: a capacity or a step's bucket."""

    rows: int
    columns: int
    width: int


def round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def round_columns(n: int, step: int = COLUMN_STEP) -> int:
    """n columns (or context positions) -> their bucket: a multiple of `step`, and of an eighth of
    the power of two above n where that is coarser (4,000 -> 4,096, 5,000 -> 5,120): fewer buckets
    for long inputs, each padding at most a quarter."""
    return round_up(n, max(step, 1 << max(n.bit_length() - 3, 0))) if n > 0 else 0


def bucket_rows(n: int, max_batch: int) -> int:
    """n rows -> the next power of two, at most `max_batch` (and never below n)."""
    return max(n, min(1 << max(n - 1, 0).bit_length(), max_batch))


def supported(model) -> bool:
    """Whether the decoder's cache can be static: full attention in every layer (a sliding-window
    layer drops old positions, which the shared column layout cannot express)."""
    config = getattr(model.decoder, "config", None)
    try:
        layers = StaticCache(config=config, max_cache_len=1).layers
    except Exception:  # a cache this transformers cannot make static
        return False
    return bool(layers) and not any(getattr(layer, "is_sliding", False) for layer in layers)


def _axis(name: str) -> tuple[str, int]:
    """A buffer's second axis: ("columns", dim) for the decoder cache (k<i>, v<i>) and mask, ("width",
    dim) for the context's keys/values (ck<i>, cv<i>) and key bias, ("row", 0) for the others."""
    if name == "mask":
        return "columns", 1
    if name[0] in "kv" and name[1:].isdigit():
        return "columns", 2
    if name == "key_bias":
        return "width", 3
    return ("width", 2) if name.startswith(("ck", "cv")) else ("row", 0)


class StaticBatch:
    """The running batch's decoder cache and contexts in bucketed buffers (see the module doc).
    `join`, `keep` and `step` behave as `decoding.Batch`'s plus `RowContexts`' together."""

    def __init__(self, model, max_batch: int, budget_bytes: int, steps, step: int = COLUMN_STEP):
        self.model, self.max_batch, self.budget = model, max_batch, budget_bytes
        self.steps, self.step_size = steps, step  # the `captured.StepGraphs` that runs the buckets' steps
        self.device = next(model.parameters()).device
        c = model.decoder.config
        self.decoder_layers = c.num_hidden_layers
        self.kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.dtype = next(model.decoder.parameters()).dtype
        self.vocab = model.decoder.get_output_embeddings().weight.shape[0]
        self.blocks = {int(i): b for i, b in model.cross_attn.items()}
        self.bias_dtype = next(iter(self.blocks.values())).q_proj.weight.dtype
        self.trained = model.config.applied_length_scaling  # length scaling's L (None: off, or top-k)
        self.capacity = Shape(0, 0, 0)
        self.generation = 0  # bumped whenever the buffers are replaced: graphs on the old ones are stale
        self.slots: list[int] = []  # per row, in row order: its slot
        self.pads: list[int] = []  # per row: its first real column
        self.ends: list[int] = []  # per row: its context positions (0: none)
        self.T = 0  # columns written; the next step writes column T
        self.buf: dict[str, torch.Tensor] = {}
        self._index: torch.Tensor | None = None

    # ------------------------------------------------------------------ sizes
    @property
    def size(self) -> int:
        return len(self.slots)

    @property
    def length(self) -> int:
        """Decoder columns the rows use (from the first column any row attends to)."""
        return self.T - min(self.pads) if self.slots else 0

    @property
    def width(self) -> int:
        """Context positions the rows use."""
        return max(self.ends, default=0)

    def bucket(self, rows: int, columns: int, width: int) -> Shape:
        return Shape(bucket_rows(rows, self.max_batch), round_columns(columns, self.step_size),
                     round_columns(width, self.step_size))

    def _spec(self, shape: Shape) -> dict[str, tuple[tuple, torch.dtype]]:
        """Every buffer of a capacity: name -> (shape, dtype)."""
        r, c, w = shape
        long, cache = torch.long, (r, self.kv_heads, c, self.head_dim)
        spec = {f"{kind}{i}": (cache, self.dtype) for i in range(self.decoder_layers) for kind in "kv"}
        spec |= {f"n{i}": ((), long) for i in range(self.decoder_layers)}  # each layer's cumulative length
        spec |= {"mask": ((r, c), torch.bool), "positions": ((r, 1), long), "tokens": ((r, 1), long),
                 "logits": ((r, self.vocab), torch.float32)}
        if w:
            for i, b in self.blocks.items():
                kv = ((r, b.num_kv_heads, w, b.head_dim), b.k_proj.weight.dtype)
                spec |= {f"ck{i}": kv, f"cv{i}": kv}
            spec |= {"key_bias": ((r, 1, 1, w), self.bias_dtype), "row_gate": ((r, 1, 1), self.bias_dtype)}
            if self.trained is not None:
                spec["query_scale"] = ((r, 1, 1, 1), self.bias_dtype)
        return spec

    def bytes_for(self, shape: Shape) -> int:
        """Device bytes the buffers of capacity `shape` hold."""
        return sum(math.prod(s) * d.itemsize for s, d in self._spec(shape).values())

    def footprint(self, rows: int, length: int, remaining: int, width: int) -> int:
        """Bytes a batch of `rows` needs at its peak: `length + remaining` decoder columns and `width`
        context positions per row, each bucketed."""
        return self.bytes_for(self.bucket(rows, length + remaining, width))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buf.values())

    # ------------------------------------------------------------------ buffers
    def _allocate(self, shape: Shape) -> dict[str, torch.Tensor]:
        buf = {name: torch.zeros(s, dtype=d, device=self.device) for name, (s, d) in self._spec(shape).items()}
        if "query_scale" in buf:
            buf["query_scale"].fill_(1.0)
        return buf

    def _row_buffers(self) -> list[torch.Tensor]:
        """Buffers holding per-row state between steps (not tokens and logits, rewritten every step)."""
        return [t for name, t in self.buf.items() if name not in ("tokens", "logits") and t.dim()]

    def _column_buffers(self) -> list[tuple[torch.Tensor, int]]:
        """(buffer, its column dimension) of the decoder cache and mask."""
        return [(t, _axis(name)[1]) for name, t in self.buf.items() if _axis(name)[0] == "columns"]

    def layer_lengths(self) -> list[torch.Tensor]:
        return [self.buf[f"n{i}"] for i in range(self.decoder_layers)]

    def slot_index(self) -> torch.Tensor:
        """The rows' slots (B,) on the device (made once per change of rows)."""
        if self._index is None:
            self._index = torch.tensor(self.slots, dtype=torch.long, device=self.device)
        return self._index

    def _set_length(self, t: int) -> None:
        self.T = t
        for n in self.layer_lengths():
            n.fill_(t)

    # ------------------------------------------------------------------ rows joining and leaving
    def join(self, joiner, contexts, columns: int) -> None:
        """Add the rows of `joiner` (a prefilled `decoding.Batch`) with their `contexts` (`RowContexts`).
        `columns`: decoder columns the batch will need at its peak (admission's count)."""
        n, p = joiner.size, joiner.length
        if n == 0:
            return
        self.reserve(self.bucket(self.size + n, max(columns, p), max(self.width, contexts.width)))
        if p > self.T:
            self._shift(p - self.T)
        taken = set(self.slots)
        slots = [s for s in range(self.capacity.rows) if s not in taken][:n]
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        start = self.T - p
        for i, layer in enumerate(joiner.cache.layers):
            self.buf[f"k{i}"].narrow(2, start, p).index_copy_(0, index, layer.keys)
            self.buf[f"v{i}"].narrow(2, start, p).index_copy_(0, index, layer.values)
        mask = torch.zeros((n, self.capacity.columns), dtype=torch.bool, device=self.device)
        mask[:, start : self.T] = joiner.mask.bool()
        self.buf["mask"].index_copy_(0, index, mask)
        self.buf["positions"].index_copy_(0, index, joiner.next_positions)
        if self.capacity.width:
            self._join_contexts(index, contexts)
        self.slots += slots
        self.pads += [start + pad for pad in joiner.pads]
        self.ends += list(contexts.ends)
        self._index = None

    def _join_contexts(self, index: torch.Tensor, contexts) -> None:
        """The newcomers' cross-attention keys/values and their `ContextBias` rows."""
        w = contexts.width
        mask = torch.zeros((len(index), self.capacity.width), dtype=torch.bool, device=self.device)
        if w:
            mask[:, :w] = contexts.mask
            for i, (k, v) in contexts.kv.items():
                self.buf[f"ck{i}"].narrow(2, 0, w).index_copy_(0, index, k)
                self.buf[f"cv{i}"].narrow(2, 0, w).index_copy_(0, index, v)
        # the same scale and bias the batch's own `CrossAttentionCache` would build for these rows
        scale = None if self.trained is None else CrossAttentionCache().logit_scale(mask, self.trained)
        bias = ContextBias.build(mask, scale, self.bias_dtype)
        self.buf["key_bias"].index_copy_(0, index, bias.key_bias)
        self.buf["row_gate"].index_copy_(0, index, bias.row_gate)
        if "query_scale" in self.buf:
            ones = torch.ones_like(self.buf["query_scale"][: len(index)])
            self.buf["query_scale"].index_copy_(0, index, ones if bias.query_scale is None else bias.query_scale)

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows; the others' slots are free (nothing is copied)."""
        self.slots, self.pads, self.ends = ([xs[i] for i in indices] for xs in (self.slots, self.pads, self.ends))
        self._index = None

    def clear(self) -> None:
        """No rows; the buffers (and the graphs captured on them) stay for the next ones."""
        self.keep([])
        self.T = 0

    def release(self) -> None:
        """No rows and no buffers (after a failure: nothing of the old state is trusted)."""
        self.clear()
        self.buf, self.capacity = {}, Shape(0, 0, 0)
        self.generation += 1

    # ------------------------------------------------------------------ layout changes
    def reserve(self, need: Shape) -> None:
        """Make the capacity hold `need`: each dimension grown to it where that fits the budget (the
        graphs of smaller buckets stay useful), else exactly `need` (admission checked that it fits)."""
        cap = self.capacity
        if all(c >= n for c, n in zip(cap, need)):
            return
        wider = Shape(*(max(c, n) for c, n in zip(cap, need)))
        self._reallocate(wider if self.bytes_for(wider) <= self.budget else need)

    def _reallocate(self, shape: Shape) -> None:
        """New buffers of capacity `shape`, the live rows copied into slots 0..B-1 and their columns
        from 0 (leading columns nobody attends to dropped)."""
        old, new = self.buf, self._allocate(shape)
        rows = len(self.slots)
        if rows and old:
            index, first = self.slot_index(), min(self.pads)
            used = self.T - first
            gate = old["row_gate"].index_select(0, index).unsqueeze(-1) if "row_gate" in old else None
            for name, t in new.items():
                if name not in old or name in ("tokens", "logits") or not t.dim():
                    continue
                (axis, dim), src, dst = _axis(name), old[name].index_select(0, index), t[:rows]
                if axis == "columns":
                    dst.narrow(dim, 0, used).copy_(src.narrow(dim, first, used))
                elif axis == "width":
                    w = min(src.shape[dim], dst.shape[dim])  # every row's context fits both
                    dst.narrow(dim, 0, w).copy_(src.narrow(dim, 0, w))
                    if name == "key_bias":  # the new positions are padding: masked for rows with context
                        dst[..., w:] = torch.where(gate > 0, float("-inf"), 0.0).to(t.dtype)
                else:
                    dst.copy_(src)
            self.pads = [p - first for p in self.pads]
            self.T = used
        self.buf, self.capacity = new, shape
        self.slots = list(range(rows))
        self._index = None
        self._set_length(self.T)
        self.generation += 1

    def _shift(self, delta: int) -> None:
        """Move every row's decoder columns by `delta` (right > 0, left < 0: dropping -delta leading
        columns no row attends to)."""
        moved = self.T - max(0, -delta)
        src, dst = max(0, -delta), max(0, delta)
        rows = max(self.slots) + 1 if self.slots else 0
        if rows and moved:
            for t, dim in self._column_buffers():
                view = t[:rows]
                part = view.narrow(dim, src, moved).clone()  # source and destination overlap
                view.narrow(dim, dst, moved).copy_(part)
            if delta > 0:
                self.buf["mask"][:rows, :delta] = False
        self.pads = [p + delta for p in self.pads]
        self._set_length(self.T + delta)

    def _compact(self, rows: int) -> None:
        """Move the rows in slots >= `rows` into free slots below it."""
        high = [i for i, s in enumerate(self.slots) if s >= rows]
        taken = set(self.slots)
        free = [s for s in range(rows) if s not in taken][: len(high)]
        src = torch.tensor([self.slots[i] for i in high], dtype=torch.long, device=self.device)
        dst = torch.tensor(free, dtype=torch.long, device=self.device)
        for t in self._row_buffers():
            t.index_copy_(0, dst, t.index_select(0, src))
        for i, s in zip(high, free):
            self.slots[i] = s
        self._index = None

    def prepare(self) -> Shape:
        """Before a step: rows compacted into their bucket, leading columns dropped where that gives a
        smaller column bucket. Returns the step's bucket."""
        rows = bucket_rows(len(self.slots), self.max_batch)
        if max(self.slots) >= rows:
            self._compact(rows)
        first = min(self.pads)

        def columns(n: int) -> int:
            return round_columns(n, self.step_size)

        if first and (self.T + 1 > self.capacity.columns or columns(self.T + 1 - first) < columns(self.T + 1)):
            self._shift(-first)
        if self.T + 1 > self.capacity.columns:
            raise RuntimeError(f"decoder cache full: {self.T + 1} columns needed, capacity {self.capacity.columns}")
        return Shape(rows, columns(self.T + 1), columns(self.width))

    # ------------------------------------------------------------------ the step
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,) and run one step: (B, V) float32 logits, rows in row order."""
        bucket = self.prepare()
        index = self.slot_index()
        self.buf["tokens"].view(-1).index_copy_(0, index, tokens.to(self.device).view(-1))
        self.steps.run(self, bucket)
        self.T += 1
        return self.buf["logits"].index_select(0, index)
