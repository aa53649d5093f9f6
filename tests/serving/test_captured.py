"""Captured decoding steps (serving/static_batch.py, serving/captured.py): the bucketed step on
fixed buffers computes what the dynamic step computes, reads nothing on the host, stays in its
memory budget, and keeps a bounded set of graphs."""

from __future__ import annotations

import pytest
import torch
from serving_harness import tiny_serving_model

from cepe.model import decoding
from cepe.model.graphs import HostSyncs
from cepe.serving import captured
from cepe.serving.batch_context import RowContexts
from cepe.serving.captured import StepGraphs, use_graphs
from cepe.serving.continuous import EagerRows
from cepe.serving.static_batch import Shape, StaticBatch, bucket_rows, round_columns

DOCS = ["the quick brown fox jumps over the lazy dog. " * 3, "a short note.",
        "completely different words, numbers 123 and 456, and a longer tail " * 2]


@pytest.fixture(scope="module")
def model():
    return tiny_serving_model()


@torch.no_grad()
def _newcomers(model, prompts, docs):
    """Prefill rows of their own, as the batcher does: (joiner batch, contexts, first tokens)."""
    contexts = RowContexts.build(model, [[model.encode_context([d]) for d in ds] for ds in docs])
    joiner = decoding.Batch(model, 0, context=contexts.context)
    tokens = joiner.prefill(prompts).argmax(-1)
    return joiner, contexts, tokens


class Twin:
    """The same rows in an `EagerRows` (the dynamic step) and a `StaticBatch`; every step feeds both
    the dynamic step's greedy tokens and compares the logits."""

    def __init__(self, model, max_batch=8, budget=2**30, column_step=4, **graphs):
        self.model = model
        self.eager = EagerRows(model, 0)
        self.static = StaticBatch(model, max_batch, budget, StepGraphs(capture_graphs=False, **graphs), column_step)
        self.tokens = None
        self.worst = 0.0

    @torch.no_grad()
    def join(self, prompts, docs, columns=64):
        for side in (self.eager, self.static):
            joiner, contexts, tokens = _newcomers(self.model, prompts, docs)
            side.join(joiner, contexts, columns)
        self.tokens = tokens if self.tokens is None else torch.cat([self.tokens, tokens])

    def keep(self, indices):
        for side in (self.eager, self.static):
            side.keep(indices)
        self.tokens = self.tokens[indices]

    @torch.no_grad()
    def step(self, n=1):
        for _ in range(n):
            want, got = self.eager.step(self.tokens), self.static.step(self.tokens)
            assert got.shape == want.shape and got.dtype == torch.float32
            self.worst = max(self.worst, float((got - want).abs().max()))
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
            assert torch.equal(got.argmax(-1), want.argmax(-1))
            self.tokens = want.argmax(-1)


@pytest.mark.parametrize("length_scaling", [None, 16])
def test_bucketed_step_gives_the_dynamic_steps_logits(model, length_scaling):
    """Rows join and leave mid-generation, with different prompt lengths (a longer newcomer shifts
    the running rows right), different contexts (wider ones grow the buffers) or none; rows move
    down into a smaller row bucket, leading columns are dropped at column-bucket edges: every step's
    logits equal the dynamic step's (fp32, 1e-5), also with length scaling (contexts past 16 tokens)."""
    model.config.cross_attn_length_scaling = length_scaling
    try:
        _join_and_leave(Twin(model))
    finally:
        model.config.cross_attn_length_scaling = None


def _join_and_leave(t: Twin) -> None:
    t.join([[5, 6, 7], [8, 9]], [[], []])  # no context at all: the step runs without cross-attention
    assert t.static.capacity.width == 0
    t.step(3)
    t.join([[10, 11, 12, 13, 14, 15, 16, 17, 18]], [[DOCS[1]]])  # longer prompt, first context
    assert t.static.capacity.width > 0 and t.static.T == t.eager.length
    t.step(2)
    t.join([[20, 21], [22, 23, 24]], [[DOCS[0], DOCS[1]], [DOCS[2]]])  # 5 rows: bucket 8, wider contexts
    t.step(3)
    t.keep([3, 4])  # the oldest rows leave: slots freed, nothing copied
    assert t.static.slots == [3, 4] and t.static.T > t.eager.length  # the dynamic batch trimmed at once
    t.step(1)  # 2 rows in bucket 2: both moved down; the columns nobody attends to dropped
    assert sorted(t.static.slots) == [0, 1] and t.static.T == t.eager.length
    t.join([[30, 31, 32]], [[]])  # a row without context joins rows with context, in a free slot
    t.step(6)
    t.keep([2])
    t.step(2)
    assert t.worst < 1e-5


def test_step_never_hands_a_value_to_the_host(model):
    """What a CUDA graph captures (the bucket's forward, with and without context) never reads a
    device value on the host."""
    for docs in ([[DOCS[0]], []], [[], []]):
        batch = StaticBatch(model, 8, 2**30, StepGraphs(capture_graphs=False), 4)
        joiner, contexts, tokens = _newcomers(model, [[5, 6, 7], [8, 9]], docs)
        batch.join(joiner, contexts, 32)
        with torch.no_grad():
            batch.step(tokens)  # first step: per-context state built
        step = captured.BucketStep(batch, batch.prepare())
        with torch.no_grad(), HostSyncs() as syncs:
            step()
            step()
        assert syncs.seen == []


def test_graphs_are_kept_per_bucket_and_dropped_with_their_buffers(model, monkeypatch):
    """With a stand-in capture (its replay runs the step): one capture per bucket, replays after,
    at most `max_graphs` kept (least recently used dropped), all dropped when the buffers are
    replaced; decoding is unchanged."""
    made = []

    class Replay:
        def __init__(self, step, device, pool):
            self.step, self.replays = step, 0
            made.append(self)

        def replay(self):
            self.replays += 1
            self.step()

    monkeypatch.setattr(captured, "capture", Replay)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    t = Twin(model, column_step=8, max_graphs=2)
    t.static.steps.capture_graphs = True
    t.join([[5, 6, 7]], [[DOCS[1]]])
    t.step(2)
    assert len(made) == 1 and made[0].replays == 2
    t.join([[8, 9]], [[DOCS[1]]])  # 2 rows: the buffers grow, the old graph goes
    t.step(1)
    assert len(made) == 2 and t.static.steps.captures == 2
    t.step(6)  # the column bucket moves on: new buckets, at most 2 kept
    assert len(t.static.steps.steps) <= 2 and len(made) > 2
    assert all(r.replays >= 1 for r in made)


def test_static_footprint_bounds_the_buffers_and_counts_padding(model):
    batch = StaticBatch(model, 8, 2**30, StepGraphs(capture_graphs=False))
    small, padded = batch.footprint(1, 10, 5, 7), batch.footprint(3, 10, 5, 7)
    assert padded == batch.bytes_for(Shape(4, 256, 256)) > batch.bytes_for(Shape(3, 256, 256))  # a bucket of 4
    assert small == batch.bytes_for(Shape(1, 256, 256)) > padded / 4
    joiner, contexts, tokens = _newcomers(model, [[5, 6, 7], [8, 9], [4]], [[DOCS[0]], [], [DOCS[2]]])
    batch.join(joiner, contexts, 3 + 5)
    assert batch.capacity == batch.bucket(3, 8, contexts.width) and batch.nbytes() == batch.bytes_for(batch.capacity)
    assert batch.nbytes() <= batch.footprint(3, 3, 5, contexts.width)


def test_buckets_and_setting():
    assert [bucket_rows(n, 128) for n in (1, 2, 3, 5, 31, 33, 128)] == [1, 2, 4, 8, 32, 64, 128]
    assert bucket_rows(5, 6) == 6 and bucket_rows(1, 6) == 1
    assert [round_columns(n) for n in (0, 1, 256, 257, 2048, 2049, 4000, 5000)] == [0, 256, 256, 512, 2048, 2560,
                                                                                     4096, 5120]
    assert use_graphs("auto", "cpu") is False and use_graphs("on", "cpu") and not use_graphs("off", "cuda")
    assert use_graphs("auto", "cuda")
    with pytest.raises(ValueError):
        use_graphs("yes", "cpu")
