"""`worker="process"` (`cepe serve --worker process`): the model in a child process answers exactly
as the in-process worker does, for stored and raw contexts, streaming and several choices."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from serving_harness import live_server, tiny_serving_model

from cepe.serving.worker_process import KeyLRU, recv_frame, send_frame

HERE = Path(__file__).resolve().parent
PROCESS = {"worker": "process", "worker_factory": "serving_harness:tiny_serving_model",
           "worker_sys_path": (str(HERE), str(HERE.parent))}
DOC = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs. " * 3


def _answers(url: str) -> list:
    doc = httpx.post(f"{url}/v1/contexts", json={"text": DOC}, timeout=60).json()["id"]
    out = []
    for body in ({"prompt": "Tell me", "max_tokens": 8, "context": [doc]},
                 {"prompt": "Tell me", "max_tokens": 8, "context": [doc]},  # the context by key alone now
                 {"prompt": "Raw one", "max_tokens": 6, "context": ["some raw context text", doc]},
                 {"prompt": "Two of them", "max_tokens": 5, "n": 2, "temperature": 0.8, "seed": 7},
                 {"prompt": "No context", "max_tokens": 7}):
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "temperature": 0, **body}, timeout=60)
        assert r.status_code == 200, r.text
        j = r.json()
        out.append(([c["text"] for c in j["choices"]], j["usage"]))
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": "Stream", "max_tokens": 6, "temperature": 0, "stream": True,
            "context": [doc]}) as r:
        chunks = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    out.append((text, [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]))
    return out


def test_a_worker_process_answers_as_the_thread_worker(tmp_path):
    model = tiny_serving_model()
    with live_server(model, tmp_path / "thread") as url:
        want = _answers(url)
    with live_server(model, tmp_path / "process", **PROCESS) as url:
        got = _answers(url)
        deadline = time.monotonic() + 10
        while (health := httpx.get(f"{url}/health").json())["queue_depth"] and time.monotonic() < deadline:
            time.sleep(0.05)  # the child's gauges come every 50 ms
        metrics = httpx.get(f"{url}/metrics").text
    assert got == want
    assert health["status"] == "ok" and health["queue_depth"] == 0
    generated = [line for line in metrics.splitlines() if line.startswith("cepe_generated_tokens_total")]
    assert generated and float(generated[0].split()[-1]) > 0  # the child's counters reach /metrics


def test_the_worker_process_logs_its_joins_where_the_server_logs(tmp_path, capfd):
    """With JSON logs on (as `cepe serve` sets them), the model process's join events, with their
    split into contexts, prefill and waiting, reach the same stderr: the load runs read them there."""
    import logging

    from cepe.serving.metrics import setup_json_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    setup_json_logging()
    try:
        with live_server(tiny_serving_model(), tmp_path, **PROCESS) as url:
            r = httpx.post(f"{url}/v1/completions", timeout=60, json={
                "model": "tiny", "prompt": "Tell me", "max_tokens": 3, "context": ["some raw context text"]})
            assert r.status_code == 200, r.text
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    events = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    joins = [e for e in events if e.get("event") == "join"]
    assert joins, "no join event from the model process"
    assert joins[0]["size"] == 1 and joins[0]["context_len"] > 0
    assert joins[0]["wait_ms"] >= 0 and joins[0]["contexts_ms"] >= 0 and joins[0]["prefill_device_ms"] > 0


def test_frames_and_the_mirrored_lru():
    import multiprocessing as mp
    import threading

    a, b = mp.Pipe()
    send_frame(a, threading.Lock(), {"op": "x", "n": 1}, (b"abc", b""))
    assert recv_frame(b) == ({"op": "x", "n": 1}, [b"abc", b""])
    lru = KeyLRU(10)
    lru.add(1, 6)
    lru.add(2, 6)  # over budget: 1 goes
    assert lru.get(1) is None and lru.get(2) == (6, None)
    lru.add(3, 50)  # alone over budget: kept, the others go
    assert list(lru.items) == [3]


def test_the_frame_thread_leaves_contexts_on_the_cpu_for_the_worker_thread():
    """The child's frame thread builds jobs while the worker thread may be capturing a CUDA graph; a
    device copy from the frame thread then fails the capture (seen as AcceleratorError on the H200).
    So received states stay on the CPU, whatever device the model is on (here: meta)."""
    import threading

    import torch

    from cepe.model.context import ContextStates
    from cepe.serving.worker_process import _job

    class Model(torch.nn.Module):
        encoder_hash = "h"

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1, device="meta"))

    states = ContextStates(torch.randn(1, 4, 3), torch.ones(1, 4, dtype=torch.bool), "h")
    w = {"key": 1, "deadline_in": 5.0, "index": 0, "kind": "generate", "prompt_ids": [1, 2],
         "contexts": [{"key": 7, "blob": 0}], "sampling": [4, 0.0, 1.0, [], False, None]}
    held = KeyLRU(2**20)
    job = _job(w, [states.to_bytes()], held, Model(), None, threading.Lock(), None)
    assert job.contexts[0].hidden_states.device.type == "cpu"
    assert torch.equal(job.contexts[0].hidden_states, states.hidden_states)
    assert held.get(7)[1] is job.contexts[0]  # the next request naming key 7 reuses it


def test_a_bad_worker_factory_fails_the_start_and_jobs_are_refused_after():
    from serving_harness import NullMetrics

    from cepe.serving.engine import ShuttingDown
    from cepe.serving.worker_process import ProcessScheduler

    spec = {"factory": "no_such_module:model", "scheduler": {"max_queue": 4, "max_batch": 2}}
    sched = ProcessScheduler(spec, NullMetrics())
    with pytest.raises(RuntimeError, match="did not start"):
        sched.start()
    with pytest.raises(ShuttingDown):
        sched.submit([object()])


def _scheduler():
    from serving_harness import NullMetrics

    from cepe.serving.worker_process import ProcessScheduler

    spec = {"factory": PROCESS["worker_factory"], "sys_path": list(PROCESS["worker_sys_path"]),
            "scheduler": {"max_queue": 8, "max_batch": 4, "batching": "continuous"}}
    return ProcessScheduler(spec, NullMetrics())


def _job(prompt_ids, max_tokens, sink):
    import time

    from test_continuous import _DirectLoop

    from cepe.serving.engine import GenerateJob, Sampling

    return GenerateJob(prompt_ids, Sampling(max_tokens, 0.0, ignore_eos=True), [], sink=sink, loop=_DirectLoop(),
                       deadline=time.monotonic() + 60)


def test_cancelled_jobs_free_the_worker_and_a_dead_worker_fails_what_it_held():
    import queue
    import time

    from cepe.serving.engine import ShuttingDown

    sched = _scheduler()
    sched.start()
    try:
        events: queue.Queue = queue.Queue()
        long_job = _job([5, 6, 7], 400, events)
        sched.submit([long_job])
        assert events.get(timeout=30)[1][0] == "delta"  # it runs
        sched.cancel(long_job)
        deadline = time.monotonic() + 30
        while (sched.running or sched.depth) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sched.running == 0 and sched.depth == 0  # the child dropped it
        while not events.empty():
            assert events.get()[1][0] == "delta"  # nothing ends a cancelled job for its (gone) client

        held = _job([5, 6], 400, events)
        sched.submit([held])
        sched._proc.kill()  # the worker dies mid-answer
        ends = []
        while not ends:
            _, event = events.get(timeout=30)
            if event[0] != "delta":
                ends.append(event)
        assert ends[0][:2] == ("error", 503) and sched.stopping
        with pytest.raises(ShuttingDown):
            sched.submit([_job([5], 2, events)])
    finally:
        sched.stop()


def test_context_lrus_out_of_step_are_reset_and_the_next_request_works():
    import queue

    from cepe.serving.engine import ShuttingDown

    sched = _scheduler()
    sched.start()
    try:
        events: queue.Queue = queue.Queue()
        ctx = tiny_serving_model().encode_context(["some context words"])
        job = _job([5, 6], 3, events)
        job.contexts = [ctx]
        ctx.__dict__["_wire_key"] = 10**6  # a key the child never received ...
        sched._sent.add(10**6, 1)  # ... that this side believes it sent
        with pytest.raises(ShuttingDown, match="retry"):
            sched.submit([job])
        assert not sched._sent.items  # both sides start afresh
        again = _job([5, 6], 3, events)
        again.contexts = [ctx]
        sched.submit([again])  # sent whole this time
        kinds = []
        while "done" not in kinds:
            kinds.append(events.get(timeout=30)[1][0])
        assert kinds[-1] == "done" and not sched.stopping
    finally:
        sched.stop()


def test_health_answers_503_once_the_worker_cannot_serve(tmp_path):
    from fastapi.testclient import TestClient

    from cepe.serving import ServeConfig, create_app

    app = create_app(tiny_serving_model(), ServeConfig(model_name="tiny", store_dir=str(tmp_path / "store")))
    with TestClient(app) as client:
        assert client.get("/health").json()["status"] == "ok"
        app.state.service.scheduler.stop()  # as when a worker process dies
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "unavailable"
