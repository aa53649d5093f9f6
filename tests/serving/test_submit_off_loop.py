"""Queueing a request happens off the event loop: a slow submit (a process worker waiting for its
child's acknowledgement) must not stall the server's other requests."""

from __future__ import annotations

import threading
import time

import httpx
from serving_harness import live_server, tiny_serving_model


def test_a_slow_submit_does_not_block_other_requests(tmp_path):
    model = tiny_serving_model()
    apps = []
    with live_server(model, tmp_path, on_app=apps.append) as url:
        scheduler = apps[0].state.service.scheduler
        real_submit = scheduler.submit

        def slow_submit(jobs):  # as a process worker's submit under load: waits on its child
            time.sleep(1.0)
            real_submit(jobs)

        scheduler.submit = slow_submit
        answers = []
        # greedy and past end-of-sequence: a sampled first token could end the answer at 0 tokens
        body = {"model": "tiny", "prompt": "the quick", "max_tokens": 2, "temperature": 0, "ignore_eos": True}
        t = threading.Thread(target=lambda: answers.append(httpx.post(f"{url}/v1/completions", json=body, timeout=30)))
        t.start()
        time.sleep(0.3)  # the completion is inside its submit now
        t0 = time.monotonic()
        health = httpx.get(f"{url}/health", timeout=30)
        waited = time.monotonic() - t0
        t.join(30)
    assert health.status_code == 200 and waited < 0.4, f"/health waited {waited:.2f} s behind a submit"
    assert answers and answers[0].status_code == 200
    assert answers[0].json()["usage"]["completion_tokens"] == 2
