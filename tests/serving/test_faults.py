"""Issue 17's hostile-client failures, each against a real server: no request can break another,
every bad input gets a 4xx with a clear message (and no server path), nothing stored is served corrupt."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import threading
import time
from pathlib import Path

import httpx
import pytest
from serving_harness import live_server, metric, slow_down, tiny_serving_model

from cepe import ContextStates

DOC = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs. " * 4
OK = {"model": "tiny", "prompt": "Hi", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def model():
    return tiny_serving_model()


def post_raw(url: str, path: str, body: dict, **kw) -> httpx.Response:
    """JSON with escapes kept as sent (a lone surrogate stays "\\ud800", as a hostile client sends it)."""
    return httpx.post(f"{url}{path}", content=json.dumps(body).encode(), headers={"Content-Type": "application/json"},
                      timeout=30, **kw)


def expect(r: httpx.Response, status: int, code: str | None = None, tmp_path=None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"]
    if code:
        assert err["code"] == code, err
    if tmp_path is not None:
        assert str(tmp_path) not in r.text and "/store" not in r.text
    return err


def test_one_requests_sampling_cannot_fail_its_batch(model, tmp_path):
    hook = slow_down(model, 0.01)
    try:
        with live_server(model, tmp_path, max_batch=8) as url:
            expect(post_raw(url, "/v1/completions", {**OK, "seed": 2**64}), 422)  # out of range: refused alone

            async def main():
                async with httpx.AsyncClient(timeout=60) as http:
                    innocent = {**OK, "max_tokens": 8, "temperature": 0.7, "seed": 3}
                    bodies = [innocent] * 6 + [{**innocent, "temperature": 1e-50}, {**innocent, "temperature": 5e-324}]
                    return await asyncio.gather(*(http.post(f"{url}/v1/completions", json=b) for b in bodies))

            responses = asyncio.run(main())
            assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses]
            assert metric(url, "batched_requests_total") > 2 * metric(
                url, "batches_total"
            )  # they shared decoding steps
    finally:
        hook.remove()


def test_oversized_text_is_refused_before_tokenizing_without_stalling_streams(model, tmp_path):
    hook = slow_down(model, 0.02)
    huge = "x" * (12 * 2**20)
    try:
        with live_server(model, tmp_path, max_tokens=200) as url:
            gaps, first = [], threading.Event()

            def stream():
                body = {**OK, "max_tokens": 150, "ignore_eos": True, "stream": True}
                with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                    last = None
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            now = time.monotonic()
                            if last is not None:
                                gaps.append(now - last)
                            last = now
                            first.set()

            t = threading.Thread(target=stream)
            t.start()
            assert first.wait(20)
            for path, body in [
                ("/v1/completions", {**OK, "prompt": huge}),
                ("/v1/completions", {**OK, "context": [huge]}),
                ("/v1/contexts", {"text": huge}),
                ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": huge}]}),
            ]:
                t0 = time.monotonic()
                err = expect(post_raw(url, path, body), 413, tmp_path=tmp_path)
                assert "characters" in err["message"] and time.monotonic() - t0 < 3
            t.join(60)
            assert gaps and max(gaps) < 1.0, max(gaps)
    finally:
        hook.remove()


def test_bad_values_get_4xx_not_500(model, tmp_path):
    with live_server(model, tmp_path, max_tokens=8) as url:
        r = post_raw(url, "/v1/completions", {**OK, "max_tokens": None})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 8
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": None}
        assert post_raw(url, "/v1/chat/completions", chat).status_code == 200
        lone = "bad \ud800 text"
        for path, body in [("/v1/completions", {**OK, "prompt": lone}),
                           ("/v1/completions", {**OK, "prompt": ["ok", lone]}),
                           ("/v1/completions", {**OK, "stop": [lone]}),
                           ("/v1/completions", {**OK, "context": [lone]}),
                           ("/v1/completions", {**OK, "context": [{"text": lone}]}),
                           ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": lone}]}),
                           ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": [
                               {"type": "text", "text": lone}]}]}),
                           ("/v1/contexts", {"text": lone}), ("/v1/contexts", {"text": "fine", "name": lone})]:
            err = expect(post_raw(url, path, body), 400, "invalid_text")
            assert "surrogate" in err["message"]
        # options the docs say are refused are refused; a harmless one is accepted
        for extra in [{"repetition_penalty": 1.2}, {"logprobs": 0}, {"logprobs": True},
                      {"response_format": {"type": "json_object"}}]:
            expect(post_raw(url, "/v1/completions", {**OK, **extra}), 400, "unsupported")
        assert post_raw(url, "/v1/completions", {**OK, "response_format": {"type": "text"}}).status_code == 200
        assert post_raw(url, "/v1/chat/completions", {**chat, "logprobs": False}).status_code == 200
        assert post_raw(url, "/v1/completions", {**OK, "repetition_penalty": 1.0}).status_code == 200


LONG = {**OK, "max_tokens": 60, "ignore_eos": True}


def start_in_turn(url: str, bodies: list[dict], queued: int) -> list[threading.Thread]:
    """Send bodies[0] and wait until it runs, then the others; return once `queued` jobs wait behind it."""
    threads = [threading.Thread(target=lambda b=b: post_raw(url, "/v1/completions", b)) for b in bodies]
    deadline = time.monotonic() + 10
    threads[0].start()
    while metric(url, "running_requests") < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    for t in threads[1:]:
        t.start()
    while metric(url, "queue_depth") < queued and time.monotonic() < deadline:
        time.sleep(0.02)
    return threads


def test_queue_counts_requests_and_refuses_impossible_n(model, tmp_path):
    hook = slow_down(model, 0.03)
    try:
        # static batching: jobs wait while a batch runs (a continuous batch would take them in)
        with live_server(model, tmp_path, max_queue=3, max_batch=8, batching="static") as url:
            err = expect(post_raw(url, "/v1/completions", {**OK, "n": 4}), 400)
            assert "--max-queue" in err["message"]
            threads = start_in_turn(url, [LONG, {**LONG, "n": 3}], queued=3)
            expect(post_raw(url, "/v1/completions", {**OK, "n": 2}), 429, "queue_full")
            assert metric(url, "rejected_total") == 1  # one request, two jobs
            for t in threads:
                t.join(30)
    finally:
        hook.remove()


def test_waiting_requests_context_memory_is_bounded(model, tmp_path):
    """The batch's memory budget counts a request's context once it joins; before that, the encoder
    states of waiting requests are bounded by --queue-context-mb. A request that would pass it gets
    429 (unless the queue is empty: alone, a request always gets in), and one adding no context
    is not held back."""
    hook = slow_down(model, 0.03)
    try:
        # static batching: jobs wait while a batch runs; a budget of one byte holds one waiting context
        with live_server(model, tmp_path, max_queue=16, max_batch=8, batching="static",
                         queue_context_mb=2**-20) as url:
            ids = [post_raw(url, "/v1/contexts", {"text": t}).json()["id"]
                   for t in ("The lighthouse keeper counted ships.", "A recipe for bread with rye flour.")]
            threads = start_in_turn(url, [LONG, {**LONG, "context": [ids[0]]}], queued=1)
            err = expect(post_raw(url, "/v1/completions", {**OK, "context": [ids[1]]}), 429, "queue_full")
            assert "--queue-context-mb" in err["message"]
            assert metric(url, "rejected_total") == 1
            plain = post_raw(url, "/v1/completions", OK)  # no context: waits its turn, answered
            assert plain.status_code == 200
            for t in threads:
                t.join(30)
    finally:
        hook.remove()


def test_non_streaming_request_stops_when_its_client_leaves(model, tmp_path):
    hook = slow_down(model, 0.03)
    try:
        with live_server(model, tmp_path) as url:
            body = {**OK, "max_tokens": 150, "ignore_eos": True}
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/v1/completions", json=body, timeout=0.8)
            t0 = time.monotonic()
            while metric(url, "running_requests") > 0 and time.monotonic() - t0 < 6:
                time.sleep(0.05)
            assert time.monotonic() - t0 < 1.5 and metric(url, "cancelled_total") == 1
            assert metric(url, "generated_tokens_total") < 80
    finally:
        hook.remove()


def test_store_faults_over_http(model, tmp_path, monkeypatch):
    store = tmp_path / "store"
    with live_server(model, tmp_path) as url:
        doc = httpx.post(f"{url}/v1/contexts", json={"text": DOC}).json()
        bad = httpx.post(f"{url}/v1/contexts", json={"text": DOC + " other"}).json()
        reup = httpx.post(f"{url}/v1/contexts", json={"text": DOC + " third"}).json()
        r = httpx.post(f"{url}/v1/completions", json={**OK, "context": [doc["id"]]}).json()
        assert r["usage"]["prompt_tokens_details"] == {"cached_tokens": doc["tokens"]}
        r = httpx.post(f"{url}/v1/completions", json={**OK, "context": [DOC]}).json()
        assert r["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    for d in (bad, reup):
        path = store / f"{d['id'][4:]}.safetensors"
        data = bytearray(path.read_bytes())
        data[-3] ^= 0xFF
        path.write_bytes(bytes(data))

    def refuse(*a, **k):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "utime", refuse)
    with live_server(model, tmp_path) as url:
        err = expect(httpx.post(f"{url}/v1/completions", json={**OK, "context": [bad["id"]]}), 404, "context_corrupt",
                     tmp_path=tmp_path)
        assert "upload it again" in err["message"]
        up = httpx.post(f"{url}/v1/contexts", json={"text": DOC + " third"})  # found corrupt by the upload: re-encoded
        assert up.status_code == 201 and up.json()["id"] == reup["id"] and up.json()["created"]
        assert sorted(d["id"] for d in httpx.get(f"{url}/v1/contexts").json()["data"]) == sorted(
            [doc["id"], reup["id"]]
        )
        again = httpx.post(f"{url}/v1/contexts", json={"text": DOC + " other"})  # the text again: stored anew
        assert again.status_code == 201 and again.json()["id"] == bad["id"]
        assert httpx.post(f"{url}/v1/completions", json={**OK, "context": [bad["id"]]}).status_code == 200
        assert (
            httpx.post(f"{url}/v1/completions", json={**OK, "context": [doc["id"]]}).status_code == 200
        )  # read-only ok
        monkeypatch.setattr(os, "unlink", refuse)
        monkeypatch.setattr(Path, "unlink", refuse)
        expect(httpx.delete(f"{url}/v1/contexts/{doc['id']}"), 507, "store_unwritable", tmp_path=tmp_path)
        assert httpx.get(f"{url}/v1/contexts/{doc['id']}").status_code == 200

        def full(self, p, state_format=None):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(ContextStates, "save", full)
        err = expect(
            httpx.post(f"{url}/v1/contexts", json={"text": "a new document"}), 507, "store_full", tmp_path=tmp_path
        )


def test_concurrent_uploads_of_one_text_encode_it_once(model, tmp_path):
    hook = model.encoder.register_forward_pre_hook(lambda module, args: time.sleep(0.3))  # encoding is slow
    try:
        with live_server(model, tmp_path) as url:
            async def main():
                async with httpx.AsyncClient(timeout=60) as http:
                    return await asyncio.gather(
                        *(http.post(f"{url}/v1/contexts", json={"text": DOC}) for _ in range(5))
                    )

            responses = asyncio.run(main())
            assert sorted(r.status_code for r in responses) == [200] * 4 + [201]
            assert [r.json()["created"] for r in responses].count(True) == 1
            assert len({r.json()["id"] for r in responses}) == 1
            assert metric(url, "encoded_tokens_total") == responses[0].json()["tokens"]
    finally:
        hook.remove()


def test_latency_histograms(model, tmp_path):
    with live_server(model, tmp_path) as url:
        httpx.post(f"{url}/v1/completions", json={**OK, "max_tokens": 5, "ignore_eos": True})
        with httpx.stream(
            "POST", f"{url}/v1/completions", json={**OK, "max_tokens": 5, "ignore_eos": True, "stream": True}
        ) as r:
            list(r.iter_lines())
        for name in ["time_to_first_token_seconds", "inter_token_seconds", "e2e_request_seconds"]:
            assert metric(url, f"{name}_count") >= 2, name
            assert metric(url, f"{name}_bucket", le="+Inf") >= 2
        assert metric(url, "inter_token_seconds_count") >= 8
        assert metric(url, "requests_total", route="/v1/completions") == 2
