"""`cepe serve` end to end: a real uvicorn server on a free loopback port, a tiny random CEPE
model, and the official `openai` client plus raw HTTP (httpx)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time

import httpx
import openai
import pytest
from serving_harness import live_server, metric, slow_down, tiny_serving_model

from cepe.serving.metrics import JsonFormatter

DOC = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs. " * 4
KEY = "test-key-123"


@pytest.fixture(scope="module")
def model():
    return tiny_serving_model()


def reference(model, prompt: str, context_text: str | None, max_tokens: int) -> str:
    """What the model itself generates greedily (transformers' generate), for comparison."""
    tok = model.tokenizer
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    ctx = model.encode_context([context_text]) if context_text else None
    out = model.generate(ids, context=ctx, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)


def test_completion_uses_stored_document(model, tmp_path):
    want = reference(model, "Hello", DOC, 10)
    assert want != reference(model, "Hello", None, 10)  # the document changes the answer
    with live_server(model, tmp_path) as url:
        r = httpx.post(f"{url}/v1/contexts", json={"text": DOC, "name": "pangrams"})
        assert r.status_code == 201, r.text
        doc = r.json()
        assert doc["id"].startswith("ctx-") and doc["name"] == "pangrams" and doc["created"]
        again = httpx.post(f"{url}/v1/contexts", json={"text": DOC})  # same text: stored once
        assert again.status_code == 200 and again.json()["id"] == doc["id"] and not again.json()["created"]
        assert metric(url, "store_hits_total") == 1
        assert metric(url, "encoded_tokens_total") == doc["tokens"]  # encoded exactly once

        oa = client(url)
        assert [m.id for m in oa.models.list().data] == ["tiny"]
        out = oa.completions.create(model="tiny", prompt="Hello", max_tokens=10, temperature=0,
                                    extra_body={"context": [doc["id"]]})
        assert out.choices[0].text == want
        assert out.usage.completion_tokens <= 10 and out.usage.prompt_tokens == 5
        raw_http = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 10,
                                                              "temperature": 0, "context": [doc["id"]]}).json()
        assert raw_http["usage"]["context_tokens"] == doc["tokens"] and raw_http["choices"][0]["text"] == want
        # raw text in `context` gives the same answer as the stored encoding of that text
        raw = oa.completions.create(
            model="tiny", prompt="Hello", max_tokens=10, temperature=0, extra_body={"context": [DOC]}
        )
        assert raw.choices[0].text == want
        assert metric(url, "encoded_tokens_total") == 2 * doc["tokens"]
        # chat, with a stored and a raw document together (explicit {"id"} / {"text"} items)
        chat = oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                          temperature=0,
                                          extra_body={"context": [{"id": doc["id"]}, {"text": "more text"}]})
        assert chat.choices[0].message.role == "assistant" and isinstance(chat.choices[0].message.content, str)
        assert chat.choices[0].finish_reason in ("stop", "length")
        # several prompts x n in one request
        multi = oa.completions.create(model="tiny", prompt=["Hello", "Hello"], n=2, max_tokens=10, temperature=0,
                                      extra_body={"context": [doc["id"]]})
        assert [c.index for c in multi.choices] == [0, 1, 2, 3] and {c.text for c in multi.choices} == {want}


def test_streaming_matches_non_streaming(model, tmp_path):
    with live_server(model, tmp_path) as url:
        oa = client(url)
        doc_id = httpx.post(f"{url}/v1/contexts", json={"text": DOC}).json()["id"]
        kw = dict(model="tiny", prompt="Stream me", max_tokens=12, temperature=0, extra_body={"context": [doc_id]})
        whole = oa.completions.create(**kw).choices[0]
        chunks = list(oa.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == whole.text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.finish_reason
        assert chunks[-1].usage.completion_tokens == len(
            model.tokenizer(whole.text, add_special_tokens=False)["input_ids"]
        )
        assert sum(1 for c in chunks if c.choices and c.choices[0].text) >= 2  # really incremental

        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        chat = (
            oa.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0)
            .choices[0]
            .message.content
        )
        parts = list(oa.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0, stream=True))
        assert parts[0].choices[0].delta.role == "assistant"
        assert "".join(p.choices[0].delta.content or "" for p in parts) == chat
        # raw SSE framing
        with httpx.stream("POST", f"{url}/v1/completions", json={**{k: v for k, v in kw.items() if k != "extra_body"},
                                                                  "stream": True}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in r.iter_lines() if line]
        assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
        assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("batching, graphs", [("static", "off"), ("continuous", "off"), ("continuous", "on")])
def test_batched_requests_match_one_at_a_time(model, tmp_path, batching, graphs):
    """Requests that share a batch (left-padded prompts, right-padded contexts, their own limits)
    get exactly what each would get alone; under continuous batching they join a running one, also
    with the bucketed static step (`--cuda-graphs on`, eager on the CPU)."""
    docs = [DOC, DOC[:-30] + " an entirely different ending."]
    cases = [("Hi", 0, 8), ("A longer prompt, padded on the left", 1, 8), ("Short limit", 0, 3)]
    want = [reference(model, p, docs[d], n) for p, d, n in cases]
    hook = slow_down(model, 0.02)
    try:
        with live_server(model, tmp_path, max_batch=4, batching=batching, cuda_graphs=graphs) as url:
            ids = [httpx.post(f"{url}/v1/contexts", json={"text": d}).json()["id"] for d in docs]
            busy = {"model": "tiny", "prompt": "busy", "max_tokens": 25, "ignore_eos": True, "temperature": 0}
            holder = threading.Thread(target=lambda: httpx.post(f"{url}/v1/completions", json=busy, timeout=30))
            holder.start()
            deadline = time.monotonic() + 5
            while metric(url, "running_requests") < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            got = [None] * len(cases)

            def ask(i, prompt, d, n):
                got[i] = httpx.post(
                    f"{url}/v1/completions",
                    json={"model": "tiny", "prompt": prompt, "max_tokens": n, "temperature": 0, "context": [ids[d]]},
                    timeout=30,
                ).json()

            askers = [threading.Thread(target=ask, args=(i, *c)) for i, c in enumerate(cases)]
            for t in askers:
                t.start()
            for t in askers + [holder]:
                t.join(30)
            assert [g["choices"][0]["text"] for g in got] == want
            if batching == "static":
                assert metric(url, "batches_total") == 2  # the busy request, then all three together
            else:  # batches are decoding steps: the three joined the busy request's 24 steps
                assert metric(url, "batches_total") == 24 and metric(url, "batched_requests_total") > 24 + 3
    finally:
        hook.remove()


def test_sampling_seed_and_stop(model, tmp_path):
    with live_server(model, tmp_path) as url:
        oa = client(url)
        a = (
            oa.completions.create(model="tiny", prompt="abc", max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
            .choices[0]
            .text
        )
        b = (
            oa.completions.create(model="tiny", prompt="abc", max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
            .choices[0]
            .text
        )
        assert a == b  # a seeded request samples the same
        greedy = oa.completions.create(model="tiny", prompt="abc", max_tokens=12, temperature=0).choices[0].text
        assert len(greedy) >= 4
        stop = greedy[2:4]
        cut = oa.completions.create(model="tiny", prompt="abc", max_tokens=12, temperature=0, stop=[stop]).choices[0]
        assert cut.finish_reason == "stop" and cut.text == greedy[: greedy.index(stop)]
        streamed = oa.completions.create(
            model="tiny", prompt="abc", max_tokens=12, temperature=0, stop=stop, stream=True
        )
        assert "".join(c.choices[0].text for c in streamed) == cut.text  # a stop string never leaks into a stream


def test_store_survives_restart_and_evicts_lru(model, tmp_path):
    texts = [f"document number {i}: " + "lorem ipsum dolor sit amet. " * 6 for i in range(3)]
    with live_server(model, tmp_path) as url:
        ids = [httpx.post(f"{url}/v1/contexts", json={"text": t}).json()["id"] for t in texts[:2]]
        one_doc = httpx.get(f"{url}/v1/contexts/{ids[0]}").json()["bytes"]
        before = client(url).completions.create(model="tiny", prompt="Q", max_tokens=8, temperature=0,
                                                extra_body={"context": ids}).choices[0].text
    with live_server(model, tmp_path) as url:  # a new process would see the same folder
        listed = httpx.get(f"{url}/v1/contexts").json()["data"]
        assert {d["id"] for d in listed} == set(ids)
        after = client(url).completions.create(model="tiny", prompt="Q", max_tokens=8, temperature=0,
                                               extra_body={"context": ids}).choices[0].text
        assert after == before
        assert httpx.delete(f"{url}/v1/contexts/{ids[1]}").json()["deleted"] is True
        assert httpx.get(f"{url}/v1/contexts/{ids[1]}").status_code == 404
        assert httpx.delete(f"{url}/v1/contexts/{ids[1]}").status_code == 404
    # a budget of two documents: using the older one makes the newer the least recently used
    with live_server(model, tmp_path, store_budget_mb=2.5 * one_doc / 2**20) as url:
        ids[1] = httpx.post(f"{url}/v1/contexts", json={"text": texts[1]}).json()["id"]
        client(url).completions.create(model="tiny", prompt="Q", max_tokens=2, extra_body={"context": [ids[0]]})
        third = httpx.post(f"{url}/v1/contexts", json={"text": texts[2]}).json()
        assert third["evicted"] == [ids[1]]
        assert {d["id"] for d in httpx.get(f"{url}/v1/contexts").json()["data"]} == {ids[0], third["id"]}
        assert metric(url, "store_evictions") == 1 and metric(url, "store_documents") == 2


def test_bad_input_gets_4xx_json_and_server_keeps_serving(model, tmp_path):
    auth = {"Authorization": f"Bearer {KEY}"}
    with live_server(model, tmp_path, api_key=KEY, max_body_mb=0.05, max_context_tokens=2000, max_tokens=32) as url:
        h = httpx.Client(base_url=url, headers=auth, timeout=30)
        ok = {"model": "tiny", "prompt": "Hi", "max_tokens": 4, "temperature": 0}

        def expect(status, response, code=None):
            assert response.status_code == status, response.text
            err = response.json()["error"]
            assert isinstance(err["message"], str) and err["message"]
            if code:
                assert err["code"] == code, err

        # API key: missing and wrong, on every route (unknown routes included)
        for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/health"),
                             ("POST", "/v1/completions"), ("GET", "/v1/contexts"), ("GET", "/no/such/route")]:
            expect(401, httpx.request(method, f"{url}{path}", json=ok), "invalid_api_key")
            expect(401, httpx.request(method, f"{url}{path}", json=ok, headers={"Authorization": "Bearer wrong"}))
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").completions.create(**ok)
        assert client(url, KEY).completions.create(**ok).choices[0].text is not None

        # unknown context ids (404) and ids that try to leave the store folder (400/404)
        missing = "ctx-" + "0" * 64
        expect(404, h.post("/v1/completions", json={**ok, "context": [missing]}), "context_not_found")
        with pytest.raises(openai.NotFoundError):
            client(url, KEY).completions.create(**ok, extra_body={"context": [missing]})
        expect(404, h.get(f"/v1/contexts/{missing}"))
        for bad in ["ctx-../../etc/passwd", "ctx-" + "A" * 64, "ctx-" + "0" * 63 + "/"]:
            expect(400, h.post("/v1/completions", json={**ok, "context": [bad]}), "invalid_context_id")
            expect(400, h.post("/v1/completions", json={**ok, "context": [{"id": bad}]}), "invalid_context_id")
        expect(
            400, h.post("/v1/completions", json={**ok, "context": [{"id": "../../etc/passwd"}]}), "invalid_context_id"
        )
        for path in ["/v1/contexts/ctx-..%2F..%2Fetc%2Fpasswd", "/v1/contexts/..%2F..%2Fstore", "/v1/contexts/%2e%2e"]:
            r = h.get(path)
            assert r.status_code in (400, 404) and "error" in r.json()
            r = h.delete(path)
            assert r.status_code in (400, 404, 405) and "error" in r.json()
        expect(400, h.get("/v1/contexts/ctx-zz"), "invalid_context_id")
        expect(400, h.post("/v1/completions", json={**ok, "context": [{"id": missing, "text": "both"}]}))

        # oversized bodies and documents (413)
        big = "x" * 60_000
        expect(413, h.post("/v1/contexts", json={"text": big}))
        expect(413, h.post("/v1/completions", json={**ok, "prompt": big}))
        chunked = h.post("/v1/contexts", content=iter([b'{"text": "', b"y" * 40_000, b"y" * 40_000, b'"}']),
                         headers={"Content-Type": "application/json"})
        expect(413, chunked)  # no Content-Length: counted while read
        chunked = h.post("/v1/completions", content=iter([b'{"model": "tiny", "prompt": "', b"y" * 60_000, b'"}']),
                         headers={"Content-Type": "application/json"})
        expect(413, chunked)
        expect(413, h.post("/v1/contexts", json={"text": "word " * 600}), "document_too_large")
        expect(413, h.post("/v1/completions", json={**ok, "context": ["word " * 600]}), "context_too_large")
        expect(413, h.post("/v1/contexts", files={"file": ("big.txt", b"z" * 60_000)}))

        # invalid JSON (400) and well-formed JSON of the wrong shape (422)
        for path in ["/v1/completions", "/v1/chat/completions", "/v1/contexts"]:
            expect(
                400, h.post(path, content=b'{"model": "tiny", "prompt": ', headers={"Content-Type": "application/json"})
            )
        expect(422, h.post("/v1/completions", json={"model": "tiny"}))
        expect(422, h.post("/v1/completions", json={**ok, "temperature": "hot"}))
        expect(422, h.post("/v1/chat/completions", json={"model": "tiny", "messages": []}))
        expect(422, h.post("/v1/contexts", json={"txt": "typo"}))
        expect(400, h.post("/v1/contexts", json={"text": "   "}))
        expect(415, h.post("/v1/contexts", content=b"plain", headers={"Content-Type": "text/plain"}))
        expect(400, h.post("/v1/contexts", files={"file": ("bad.txt", b"\xff\xfe\x00bad")}))
        expect(400, h.post("/v1/contexts", files={"other": ("a.txt", b"text")}))

        # token limits beyond the configured maximum (400), and other refusals
        expect(400, h.post("/v1/completions", json={**ok, "max_tokens": 33}), "max_tokens_too_large")
        with pytest.raises(openai.BadRequestError):
            client(url, KEY).chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=1000
            )
        expect(
            400,
            h.post("/v1/completions", json={**ok, "prompt": "p" * 500, "max_tokens": 32}),
            "context_length_exceeded",
        )
        expect(404, h.post("/v1/completions", json={**ok, "model": "gpt-4"}), "model_not_found")
        expect(400, h.post("/v1/completions", json={**ok, "logprobs": 3}), "unsupported")
        expect(400, h.post("/v1/completions", json={**ok, "n": 2, "stream": True}))
        expect(400, h.post("/v1/completions", json={**ok, "prompt": ""}))
        expect(405, h.put("/v1/completions", json=ok))
        expect(404, h.get("/v1/nothing"))

        # a good upload (JSON and multipart) still works, and so does generation
        up = h.post("/v1/contexts", files={"file": ("doc.txt", DOC.encode())}, data={"name": "from-file"})
        assert up.status_code == 201 and up.json()["name"] == "from-file"
        assert h.post("/v1/contexts", json={"text": DOC}).json()["id"] == up.json()["id"]  # same text, same id
        assert h.get("/health").json()["status"] == "ok"
        r = h.post("/v1/completions", json={**ok, "context": [up.json()["id"]]})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        assert metric(url, "requests_total", headers=auth, status="401") == 13
        assert metric(url, "requests_total", headers=auth, status="413") >= 6


def test_concurrent_clients_all_answered_or_refused(model, tmp_path):
    """32 clients x 4 requests against a queue of 12: every request gets 200 or 429, none lost."""
    hook = slow_down(model, 0.002)
    try:
        with live_server(model, tmp_path, max_queue=12, max_batch=4) as url:
            doc_id = httpx.post(f"{url}/v1/contexts", json={"text": DOC}).json()["id"]

            async def one_client(c: int, http: httpx.AsyncClient):
                results = []
                for k in range(4):
                    body = {"model": "tiny", "prompt": f"client {c} request {k}", "max_tokens": 4 + (c + k) % 5,
                            "temperature": 0}
                    if c % 2:
                        body["context"] = [doc_id]
                    r = await http.post(f"{url}/v1/completions", json=body)
                    results.append((r.status_code, r.json()))
                return results

            async def main():
                limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
                async with httpx.AsyncClient(timeout=60, limits=limits) as http:
                    return await asyncio.gather(*(one_client(c, http) for c in range(32)))

            results = [r for per_client in asyncio.run(main()) for r in per_client]
            assert len(results) == 128
            statuses = [s for s, _ in results]
            assert set(statuses) <= {200, 429}, statuses
            ok, refused = statuses.count(200), statuses.count(429)
            assert ok >= 12 and ok + refused == 128
            for status, body in results:
                if status == 200:
                    assert body["choices"][0]["finish_reason"] in ("stop", "length")
                else:
                    assert body["error"]["type"] == "rate_limit_error"
            assert metric(url, "rejected_total") == refused
            assert metric(url, "requests_total", route="/v1/completions") == 128
            # (continuous batching) a batch is a decoding step: rows shared steps
            assert metric(url, "batched_requests_total") > 1.5 * metric(url, "batches_total")
            assert metric(url, "queue_depth") == 0 and metric(url, "running_requests") == 0
            after = client(url).completions.create(model="tiny", prompt="still there?", max_tokens=3)
            assert after.choices[0].finish_reason in ("stop", "length")
    finally:
        hook.remove()


def test_disconnected_client_frees_its_slot(model, tmp_path):
    hook = slow_down(model, 0.03)  # ~30 ms a token
    try:
        with live_server(model, tmp_path, max_queue=1, max_batch=1) as url:
            long = {"model": "tiny", "prompt": "long", "max_tokens": 100, "ignore_eos": True, "temperature": 0}
            holder = threading.Thread(target=lambda: httpx.post(f"{url}/v1/completions", json=long, timeout=30))
            holder.start()  # occupies the worker for ~3 s
            deadline = time.monotonic() + 5
            while metric(url, "running_requests") < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            # a queued request whose client gives up: its slot must come back
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/v1/completions", json={**long, "prompt": "queued"}, timeout=0.3)
            deadline = time.monotonic() + 3
            while metric(url, "queue_depth") > 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert metric(url, "queue_depth") == 0 and metric(url, "cancelled_total") == 1
            assert metric(url, "running_requests") == 1  # the first request is still generating
            # a streaming client that leaves mid-answer stops its generation
            holder.join(10)
            with httpx.stream("POST", f"{url}/v1/completions", json={**long, "stream": True}, timeout=30) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        break  # first token arrived: hang up
            t0 = time.monotonic()
            while metric(url, "running_requests") > 0 and time.monotonic() - t0 < 3:
                time.sleep(0.05)
            assert metric(url, "running_requests") == 0 and time.monotonic() - t0 < 2.0  # not the full 3 s
            assert metric(url, "cancelled_total") == 2
            assert metric(url, "generated_tokens_total") < 200
    finally:
        hook.remove()


def test_generation_timeout(model, tmp_path):
    hook = slow_down(model, 0.03)
    try:
        with live_server(model, tmp_path, timeout_s=0.5) as url:
            body = {"model": "tiny", "prompt": "slow", "max_tokens": 100, "ignore_eos": True, "temperature": 0}
            t0 = time.monotonic()
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
            assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
            assert time.monotonic() - t0 < 2.5
            with pytest.raises(openai.APIError, match="timed out"):
                list(
                    client(url).completions.create(model="tiny", prompt="slow", max_tokens=100, temperature=0,
                                                   stream=True, extra_body={"ignore_eos": True})
                )
            assert metric(url, "timeouts_total") == 2
            quick = client(url).completions.create(model="tiny", prompt="ok", max_tokens=2)
            assert quick.choices[0].finish_reason in ("stop", "length")
    finally:
        hook.remove()


def test_metrics_and_json_logs(model, tmp_path):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("cepe.serving")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with live_server(model, tmp_path) as url:
            httpx.post(
                f"{url}/v1/completions",
                json={"model": "tiny", "prompt": "count me", "max_tokens": 5, "ignore_eos": True},
            )
            text = httpx.get(f"{url}/metrics").text
            for name in ["requests_total", "tokens_per_second", "queue_depth", "store_bytes", "generated_tokens_total"]:
                assert f"\ncepe_{name}" in text
            assert metric(url, "generated_tokens_total") == 5 and metric(url, "tokens_per_second") > 0
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    requests = [e for e in lines if e.get("event") == "request"]
    assert any(
        e["route"] == "/v1/completions" and e["status"] == 200 and e["ms"] >= 0 and e["request_id"] for e in requests
    )
    joins = [e for e in lines if e.get("event") == "join"]  # continuous batching
    assert any(e["size"] == 1 for e in joins)
    assert all(e["wait_ms"] >= 0 and e["contexts_ms"] >= 0 and e["prefill_device_ms"] > 0 for e in joins)
    assert any(e.get("event") == "leave" and e["new_tokens"] == 5 for e in lines)
    assert any(e.get("event") == "ready" for e in lines)


def test_documents_stored_in_int8_answer_like_the_same_states_read_back(model, tmp_path):
    """`--store-format int8`: the file holds 8-bit states, and the answer over the stored id is
    the answer over those states as a file gives them back (not the full-precision encoding)."""
    from safetensors.torch import load_file

    with live_server(model, tmp_path, store_format="int8") as url:
        oa = client(url)
        doc = httpx.post(f"{url}/v1/contexts", json={"text": DOC}).json()
        path = next((tmp_path / "store").glob("*.safetensors"))
        assert load_file(str(path))["hidden_states"].element_size() == 1
        got = oa.completions.create(model="tiny", prompt="What is stored?", max_tokens=10, temperature=0,
                                    extra_body={"context": [doc["id"]]}).choices[0].text
    from cepe import ContextStates

    tok = model.tokenizer
    ids = tok("What is stored?", add_special_tokens=False, return_tensors="pt").input_ids
    stored = ContextStates.load(path)  # what the server reads back
    assert stored.hidden_states.dtype == model.encode_context([DOC]).hidden_states.dtype
    out = model.generate(ids, context=stored, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    assert got == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
