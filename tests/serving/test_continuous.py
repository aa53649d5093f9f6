"""Continuous batching (serving/continuous.py): rows join and leave the running batch at every step."""

from __future__ import annotations

import queue
import threading
import time

import pytest
import torch
from serving_harness import NullMetrics, slow_down, tiny_serving_model

from cepe.serving.engine import GenerateJob, Runner, Sampling, Scheduler


class _DirectLoop:
    """Stands in for the handler's event loop: events go straight into a thread-safe queue."""

    def call_soon_threadsafe(self, fn, *args):
        fn(*args)


class Harness:
    """A model worker (Scheduler + Runner) without HTTP; collects each job's text and end."""

    def __init__(self, model, batching="continuous", **kw):
        self.model = model
        self.runner = Runner(model, model.tokenizer, threading.Lock(), NullMetrics())
        self.scheduler = Scheduler(self.runner, max_queue=64, metrics=NullMetrics(), batching=batching,
                                   **{"max_batch": 8, **kw})
        self.sink: queue.Queue = queue.Queue()
        self.jobs: list[GenerateJob] = []
        self.text: dict[int, str] = {}
        self.end: dict[int, tuple] = {}
        self.first_token_at: dict[int, float] = {}

    def __enter__(self):
        self.scheduler.start()
        return self

    def __exit__(self, *exc):
        self.scheduler.stop()

    def submit(self, prompt: str, sampling: Sampling, docs: list[str] = ()) -> GenerateJob:
        ids = self.model.tokenizer(prompt, add_special_tokens=False).input_ids
        contexts = [self.model.encode_context([d]) for d in docs]
        job = GenerateJob(ids, sampling, contexts, sink=self.sink, loop=_DirectLoop(),
                          deadline=time.monotonic() + 60, index=len(self.jobs))
        self.jobs.append(job)
        self.scheduler.submit([job])
        return job

    def wait(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.end) < len(self.jobs):
            i, event = self.sink.get(timeout=max(0.01, deadline - time.monotonic()))
            if event[0] == "delta":
                self.text[i] = self.text.get(i, "") + event[1]
                self.first_token_at.setdefault(i, time.monotonic())
            else:
                self.end[i] = event

    def wait_running(self, n: int = 1) -> None:
        deadline = time.monotonic() + 10
        while self.scheduler.running < n and time.monotonic() < deadline:
            time.sleep(0.005)


DOCS = ["the quick brown fox jumps over the lazy dog. " * 3,
        "a short note.",
        "completely different words, numbers 123 and 456, and a longer tail to pad it out " * 2]


def alone(model, prompt, sampling, docs=()):
    with Harness(model, batching="static", max_batch=1) as h:
        h.submit(prompt, sampling, docs)
        h.wait()
        return h.text.get(0, ""), h.end[0][:2]


@pytest.fixture(scope="module")
def model():
    return tiny_serving_model()


@pytest.mark.parametrize("graphs", ["off", "on"])
def test_greedy_rows_joining_mid_way_equal_one_at_a_time(model, graphs):
    """A long request runs; others join at different steps with different contexts (or none),
    prompt lengths, stop strings and token limits, and leave at different steps: each answer is
    what it is alone. Also with the bucketed static step (`--cuda-graphs on`: eager on the CPU)."""
    cases = [("Tell me a long story", Sampling(24, 0.0, ignore_eos=True), [DOCS[0]]),
             ("Hi", Sampling(6, 0.0, ignore_eos=True), [DOCS[1]]),
             ("A much longer prompt than the others, padded", Sampling(9, 0.0, ignore_eos=True), [DOCS[2], DOCS[1]]),
             ("No context at all", Sampling(5, 0.0, ignore_eos=True), []),
             ("Stop me", Sampling(12, 0.0, ignore_eos=True), [DOCS[0]])]
    want = [alone(model, *c) for c in cases]
    stop_text = want[4][0][3:5]  # a stop string cutting the last answer mid-way
    cases[4] = (cases[4][0], Sampling(12, 0.0, stop=(stop_text,), ignore_eos=True), cases[4][2])
    want[4] = alone(model, *cases[4])
    assert want[4][1] == ("done", "stop")
    hook = slow_down(model, 0.01)
    try:
        with Harness(model, cuda_graphs=graphs) as h:
            h.submit(*cases[0])
            h.wait_running(1)
            for c in cases[1:3]:
                h.submit(*c)
            time.sleep(0.08)  # a few steps later
            for c in cases[3:]:
                h.submit(*c)
            h.wait()
            batcher = h.scheduler.batcher
    finally:
        hook.remove()
    got = [(h.text.get(i, ""), h.end[i][:2]) for i in range(len(cases))]
    assert got == want
    assert batcher.rows == [] and batcher.running.size == 0  # everyone left
    assert batcher.static == (graphs == "on")


@pytest.mark.parametrize("graphs", ["off", "on"])
def test_extreme_sampling_of_a_joining_row_never_changes_another(model, graphs):
    seeded = Sampling(16, 0.9, 0.95, ignore_eos=True, seed=123)
    greedy = Sampling(16, 0.0, ignore_eos=True)
    want = [alone(model, "Once upon", seeded, [DOCS[0]]), alone(model, "Hello", greedy)]
    extreme = [
        Sampling(10, 1e-50, ignore_eos=True, seed=10**40),
        Sampling(10, 2.0, 1e-9, ignore_eos=True, seed=-(2**80)),
        Sampling(10, 5e-324, ignore_eos=True),
    ]
    hook = slow_down(model, 0.01)
    try:
        with Harness(model, cuda_graphs=graphs) as h:
            h.submit("Once upon", seeded, [DOCS[0]])
            h.submit("Hello", greedy)
            h.wait_running(2)
            for s in extreme:
                h.submit("Weird", s, [DOCS[2]])
            h.wait()
    finally:
        hook.remove()
    assert [(h.text.get(i, ""), h.end[i][:2]) for i in range(2)] == want
    assert all(h.end[i][:2] == ("done", "length") for i in range(2, 5))


@pytest.mark.parametrize("graphs", ["off", "on"])
def test_admission_never_exceeds_the_budget(model, graphs):
    """A budget for about two rows: six requests are served two at a time, the batch never holds
    more than the budget, and a request too big for an empty batch gets 413. With static buffers
    (`--cuda-graphs on`) the budget counts them padded: rows, columns and context in buckets."""
    probe = Harness(model)
    from cepe.serving.continuous import ContinuousBatcher

    b = ContinuousBatcher(probe.scheduler, probe.runner, 8, 0, cuda_graphs=graphs)
    ctx = model.encode_context([DOCS[2]])
    per_row = b.footprint(1, 12, 10, ctx.hidden_states.shape[1])
    budget = int(2.5 * per_row)
    hook = slow_down(model, 0.005)
    try:
        with Harness(model, batch_memory_bytes=budget, cuda_graphs=graphs) as h:
            seen = []
            watcher = threading.Event()

            def watch():
                while not watcher.is_set():
                    seen.append(len(h.scheduler.batcher.rows))
                    time.sleep(0.002)

            t = threading.Thread(target=watch)
            t.start()
            for k in range(6):
                h.submit(f"question {k}", Sampling(10, 0.0, ignore_eos=True), [DOCS[2]])
            h.submit("x" * 10, Sampling(10, 0.0, ignore_eos=True), [DOCS[2] * 4])  # alone over the budget
            h.wait()
            watcher.set()
            t.join()
            peak = h.scheduler.batcher.peak_bytes
    finally:
        hook.remove()
    assert all(h.end[k][:2] == ("done", "length") for k in range(6))
    assert h.end[6][:3] == ("error", 413, h.end[6][2]) and "--batch-memory-mb" in h.end[6][2]
    assert 0 < peak <= budget
    assert max(seen) == 2  # the budget, not --max-batch (8), bounded the batch


def test_cancelling_a_running_row_frees_its_slot(model):
    hook = slow_down(model, 0.02)
    try:
        with Harness(model, max_batch=1) as h:
            long = h.submit("long", Sampling(200, 0.0, ignore_eos=True))
            h.wait_running(1)
            waiting = h.submit("next", Sampling(3, 0.0, ignore_eos=True))
            time.sleep(0.1)
            assert waiting.index not in h.first_token_at and h.scheduler.depth == 1  # the slot is taken
            t0 = time.monotonic()
            h.scheduler.cancel(long)
            h.end[long.index] = ("cancelled",)  # a cancelled job sends nothing more
            h.wait(timeout=10)
    finally:
        hook.remove()
    assert h.end[waiting.index][:2] == ("done", "length")
    assert h.first_token_at[waiting.index] - t0 < 1.0  # started at once, not after 200 tokens (4 s)


def _last_used(mask) -> list[int]:
    return [int(row.nonzero().max()) + 1 if row.any() else 0 for row in mask]


def test_row_contexts_join_and_keep_equal_building_them_together(model):
    """Joining rows (with or without context, narrower or wider) and dropping rows gives the same
    padded states, mask and keys/values as building the remaining rows at once (up to padding)."""
    from cepe.serving.batch_context import RowContexts

    docs = [[model.encode_context([DOCS[0]])], [], [model.encode_context([DOCS[2]]), model.encode_context([DOCS[1]])],
            []]
    for split in (1, 2, 3):
        for order in (docs, docs[::-1]):
            joined = RowContexts.build(model, order[:split])
            joined.join(RowContexts.build(model, order[split:]))
            whole = RowContexts.build(model, order)
            assert joined.size == whole.size == 4
            assert joined.ends == _last_used(joined.mask)  # the host's record, without reading the device
            s = whole.width
            assert joined.width >= s and not joined.mask[:, s:].any()
            assert torch.equal(joined.mask[:, :s], whole.mask)
            for layer, (k, _v) in whole.kv.items():
                assert torch.allclose(joined.kv[layer][0][:, :, :s], k, atol=1e-6)
            joined.keep([0, 3])  # two rows without context or one of each: trailing padding trimmed
            kept = RowContexts.build(model, [order[0], order[3]])
            assert (joined.mask is None) == (kept.mask is None)
            if kept.mask is not None:  # fresh encodings end in chunk padding, which keep() trims
                assert joined.width == int(kept.mask.any(0).nonzero().max()) + 1
                assert joined.ends == _last_used(joined.mask)
    empty = RowContexts.build(model, [[], []])
    assert empty.context is None and empty.width == 0
    empty.join(RowContexts.build(model, [docs[0]]))
    assert empty.size == 3 and empty.context.batch_size == 3 and not empty.mask[:2].any()
