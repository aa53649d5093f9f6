"""Pacing of joins in continuous batching (`cepe.serving.pacing`, `--prefill-share`)."""

from __future__ import annotations

import threading
import time

import pytest
from serving_harness import slow_down, tiny_serving_model
from test_continuous import DOCS, Harness, alone

from cepe.serving.engine import Sampling
from cepe.serving.pacing import JoinPacer


def test_an_idle_batch_or_a_long_queue_joins_at_once():
    p = JoinPacer(share=0.5)
    p.joined(0.0, 10.0)  # a 10 s join just ended
    assert p.due(10.0, running=0, waiting=3)  # nothing decoding: nothing to protect
    assert not p.due(10.0, running=4, waiting=0)  # nobody waiting
    assert p.due(10.0, running=4, waiting=4)  # as many waiting as running
    assert not p.due(10.0, running=4, waiting=3)


def test_joins_wait_in_proportion_to_the_last_join_up_to_a_cap():
    p = JoinPacer(share=0.5, max_wait_s=0.25)
    p.joined(1.0, 1.04)  # 40 ms
    assert not p.due(1.07, running=8, waiting=1)  # 30 ms of decoding since
    assert p.due(1.08, running=8, waiting=1)  # 40 ms: joins took half the time
    p = JoinPacer(share=0.2, max_wait_s=0.25)
    p.joined(1.0, 1.04)  # share 0.2: decode 4x as long as the join took, 160 ms
    assert not p.due(1.19, running=8, waiting=1)
    assert p.due(1.21, running=8, waiting=1)
    p.joined(2.0, 12.0)  # a 10 s join: the wait is capped
    assert not p.due(12.2, running=8, waiting=1)
    assert p.due(12.25, running=8, waiting=1)


def test_share_one_joins_at_every_step_and_bad_settings_are_refused():
    p = JoinPacer(share=1.0)
    p.joined(0.0, 5.0)
    assert p.due(5.0, running=8, waiting=1)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="share"):
            JoinPacer(share=bad)
    with pytest.raises(ValueError, match="max_wait_s"):
        JoinPacer(max_wait_s=-1)


class _Gate:
    """A pacer that holds joins back while rows decode until the test opens it."""

    def __init__(self):
        self.open = threading.Event()

    def due(self, now, running, waiting):
        return running == 0 or (waiting > 0 and self.open.is_set())

    def joined(self, start, end):
        pass


def test_the_batcher_consults_the_pacer_and_a_held_back_row_answers_as_alone():
    model = tiny_serving_model()
    long_row = ("Tell me a long story", Sampling(40, 0.0, ignore_eos=True), [DOCS[0]])
    newcomer = ("Hi", Sampling(6, 0.0, ignore_eos=True), [DOCS[1]])
    want = alone(model, *newcomer)
    hook = slow_down(model, 0.01)
    try:
        with Harness(model) as h:
            gate = _Gate()
            h.scheduler.batcher.pacer = gate
            h.submit(*long_row)
            h.wait_running(1)
            h.submit(*newcomer)
            time.sleep(0.15)  # the long row decodes on; the newcomer waits for the pacer
            batcher = h.scheduler.batcher
            held_back = (h.scheduler.depth, len(batcher.rows))
            gate.open.set()
            h.wait()
    finally:
        hook.remove()
    assert held_back == (1, 1)  # queued, while the long row kept decoding
    assert (h.text.get(1, ""), h.end[1][:2]) == want
    assert h.end[0][:2] == ("done", "length")
