"""The model worker's decoding (serving/engine.py through cepe.model.decoding): per-row sampling."""

from __future__ import annotations

import asyncio
import threading
import time

from serving_harness import NullMetrics, tiny_serving_model

from cepe.serving.engine import GenerateJob, Runner, Sampling


def _run(runner: Runner, samplings: list[Sampling]) -> list[tuple]:
    """Decode one batch of jobs (prompt "Hello"); each job's text and final event."""
    loop = asyncio.new_event_loop()
    sink: asyncio.Queue = asyncio.Queue()
    prompt = runner.tokenizer("Hello", add_special_tokens=False).input_ids
    jobs = [GenerateJob(prompt, s, sink=sink, loop=loop, deadline=time.monotonic() + 60, index=i)
            for i, s in enumerate(samplings)]
    runner.run(jobs)
    loop.run_until_complete(asyncio.sleep(0))  # deliver the events scheduled from the "worker"
    text, final = ["" for _ in jobs], [None for _ in jobs]
    while not sink.empty():
        i, event = sink.get_nowait()
        if event[0] == "delta":
            text[i] += event[1]
        else:
            final[i] = event[:2]
    loop.close()
    return list(zip(text, final))


def test_one_rows_extreme_settings_never_fail_or_change_the_others():
    model = tiny_serving_model()
    runner = Runner(model, model.tokenizer, threading.Lock(), NullMetrics())
    seeded = Sampling(max_tokens=8, temperature=0.9, top_p=0.95, ignore_eos=True, seed=123)
    greedy = Sampling(max_tokens=8, temperature=0.0, ignore_eos=True)
    alone = _run(runner, [seeded, greedy])
    extreme = [Sampling(max_tokens=8, temperature=1e-50, ignore_eos=True, seed=10**40),
               Sampling(max_tokens=8, temperature=2.0, top_p=1e-9, ignore_eos=True, seed=-(2**80))]
    mixed = _run(runner, [extreme[0], seeded, greedy, extreme[1]])
    assert mixed[1] == alone[0] and mixed[2] == alone[1]  # the same tokens as without the extreme rows
    assert mixed[1][1] == ("done", "length") and len(mixed[1][0]) > 0
    # a vanishing temperature, or top_p keeping one token, is greedy decoding
    assert mixed[0] == alone[1] and mixed[3] == alone[1]
