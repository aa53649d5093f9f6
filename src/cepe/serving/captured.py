"""Captured decoding steps for the continuous batcher (`cepe serve --cuda-graphs`).

An eager step of SmolLM2-135M with 15 cross-attention layers launches ~1,270 kernels (B = 1), each
with its Python and launch cost: on an H200 the server waited ~43 ms between tokens where the
GPU's work is a few. A step of the running batch (`static_batch.StaticBatch`) instead runs on
fixed buffers per bucket of rows, decoder columns and context positions; on CUDA each bucket's step
is captured once as a CUDA graph (`cepe.model.graphs.capture`, as the decoding benchmark does) and
replayed after. Sampling, stops and text stay on the host, as before: the graph covers the forward
up to the logits.

- `BucketStep`: the forward of one bucket over views of the batch's buffers -- a Hugging Face
  `StaticCache` whose layers are the decoder buffers, a `ContextStates` whose cross-attention cache
  holds the context buffers and a pinned `ContextBias` -- writing the logits into the batch's
  logits buffer. It reads nothing on the host, so it can be captured.
- `StepGraphs`: the steps (and, on CUDA, their graphs) by bucket, least recently used dropped
  past `max_graphs`; all of them dropped when the batch's buffers are replaced. Graphs share one
  memory pool: they never run at the same time, and each step's output is copied out of it.

On the CPU, or with capture off, the same bucketed step runs eagerly (tests pin it against the
dynamic step). A bucket whose capture fails runs eagerly from then on, and says so in the log.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

import torch
from transformers import StaticCache

from ..model import decoding
from ..model.context import ContextStates
from ..model.cross_attention import ContextBias
from ..model.graphs import capture
from .static_batch import Shape, StaticBatch

log = logging.getLogger("cepe.serving")

MAX_GRAPHS = 64  # captured buckets kept (each holds its kernels' parameters; temporaries share one pool)


def use_graphs(setting: str, device) -> bool:
    """`--cuda-graphs auto|on|off` -> whether the batcher runs bucketed static steps. `auto` is on
    where there is something to capture (a CUDA device); `on` on the CPU runs them eagerly."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"cuda_graphs must be 'auto', 'on' or 'off', got {setting!r}")
    return setting == "on" or (setting == "auto" and torch.device(device).type == "cuda")


def _bind(layer, keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor) -> None:
    """Make a `StaticCache` layer use `keys`/`values` (B, H, C, d) and the cumulative length
    tensor `length` (0-dim) instead of buffers of its own (sized on the meta device, so its own
    lazy initialisation allocates nothing)."""
    layer.lazy_initialization(keys.new_empty(keys.shape, device="meta"), values.new_empty(values.shape, device="meta"))
    layer.keys, layer.values, layer.cumulative_length, layer.device = keys, values, length, keys.device


class BucketStep:
    """One decoding step of bucket `shape` (rows Rb, columns Cb, width Wb) on `batch`'s buffers:
    reads tokens (Rb, 1), positions, mask (Rb, Cb), the caches; writes logits (Rb, V) float32, the
    cache's column T and T + 1 as the layers' length; advances positions. `save` / `restore` undo
    it (for the warm-up before a capture)."""

    def __init__(self, batch: StaticBatch, shape: Shape):
        rows, columns, width = shape
        buf = batch.buf
        self.model, self.shape = batch.model, shape
        self.tokens, self.positions = buf["tokens"][:rows], buf["positions"][:rows]
        self.mask, self.logits = buf["mask"][:rows, :columns], buf["logits"][:rows]
        self.lengths = batch.layer_lengths()
        self.cache = StaticCache(config=batch.model.decoder.config, max_cache_len=columns)
        for i, (layer, n) in enumerate(zip(self.cache.layers, self.lengths)):
            _bind(layer, buf[f"k{i}"][:rows, :, :columns], buf[f"v{i}"][:rows, :, :columns], n)
        self.context = None
        if width:
            # the keys/values are cached and the bias pinned: neither the states nor the mask is read,
            # so they are free broadcast views; no encoder hash: every row's was checked at its prefill
            he = batch.model.encoder.hidden_size
            hidden = torch.zeros((1, 1, he), device=batch.device).expand(rows, width, he)
            ctx = ContextStates(hidden, torch.ones((1, 1), dtype=torch.bool, device=batch.device).expand(rows, width))
            for i in batch.blocks:
                ctx.cross_cache.store(i, buf[f"ck{i}"][:rows, :, :width], buf[f"cv{i}"][:rows, :, :width], "cache")
            scale = buf["query_scale"][:rows] if "query_scale" in buf else None
            bias = ContextBias(buf["key_bias"][:rows, :, :, :width], buf["row_gate"][:rows], scale)
            ctx.cross_cache.pin_bias(batch.trained, batch.bias_dtype, bias)
            self.context = ctx

    def __call__(self) -> None:
        self.mask.index_fill_(1, self.lengths[0].view(1), True)  # this step's column, for every row
        kwargs = {} if self.context is None else {"context": self.context}
        out = decoding.forward(self.model, self.tokens, self.cache, attention_mask=self.mask,
                               position_ids=self.positions, **kwargs)
        self.logits.copy_(out.logits[:, -1])
        self.positions.add_(1)

    def save(self) -> list[torch.Tensor]:
        return [self.positions.clone(), *(n.clone() for n in self.lengths)]

    def restore(self, saved: list[torch.Tensor]) -> None:
        self.positions.copy_(saved[0])
        for n, s in zip(self.lengths, saved[1:]):
            n.copy_(s)


class StepGraphs:
    """Bucket steps of one `StaticBatch`, captured as CUDA graphs when `capture_graphs` (see the
    module doc). `captures`, `capture_seconds`: counted, also into `metrics`."""

    def __init__(self, capture_graphs: bool, metrics=None, max_graphs: int = MAX_GRAPHS):
        self.capture_graphs, self.metrics, self.max_graphs = capture_graphs, metrics, max_graphs
        self.steps: OrderedDict[Shape, tuple[BucketStep, object]] = OrderedDict()
        self.generation = None
        self.pool = None
        self.captures, self.capture_seconds = 0, 0.0

    def run(self, batch: StaticBatch, shape: Shape) -> None:
        """Run bucket `shape`'s step on `batch` (writes its logits buffer)."""
        if batch.generation != self.generation:  # new buffers: every step and graph is stale
            self.steps.clear()
            self.generation, self.pool = batch.generation, None
        entry = self.steps.get(shape)
        if entry is None:
            step = BucketStep(batch, shape)
            entry = (step, self._capture(step, batch.device) if self.capture_graphs else None)
            self.steps[shape] = entry
            if len(self.steps) > self.max_graphs:
                self.steps.popitem(last=False)
        self.steps.move_to_end(shape)
        step, graph = entry
        if graph is None:
            step()
        else:
            graph.replay()

    def _capture(self, step: BucketStep, device):
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        t0 = time.perf_counter()
        try:
            graph = capture(step, device, self.pool)
        except Exception as e:  # still decodes, eagerly
            log.warning("capture failed", extra={"fields": {"event": "capture_failed", "bucket": list(step.shape),
                                                           "error": f"{type(e).__name__}: {e}"[:300]}})
            return None
        seconds = time.perf_counter() - t0
        self.captures += 1
        self.capture_seconds += seconds
        if self.metrics is not None:
            self.metrics.add("graph_captures")
            self.metrics.add("graph_capture_seconds", seconds)
        log.info("captured", extra={"fields": {"event": "captured", "bucket": list(step.shape),
                                               "ms": round(1000 * seconds, 1), "graphs": len(self.steps) + 1}})
        return graph
