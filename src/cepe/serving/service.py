"""`Service`: what the routes share (model worker, document store, tokenizers, metrics), and
`ServeConfig`, the server's limits."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
from contextlib import aclosing
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..model.stored_states import cross_kv_bytes_per_token, state_bytes_per_token
from .engine import EncodeJob, GenerateJob, QueueFull, Runner, Sampling, Scheduler, ShuttingDown
from .metrics import Metrics, RequestClock, json_logging_on
from .protocol import (
    ApiError,
    ContextRef,
    chat_body,
    chat_chunk,
    completion_body,
    completion_chunk,
    error_body,
    error_response,
    new_id,
)
from .store import ID_PREFIX, CorruptContext, DocumentStore, InvalidContextId
from .text import TextTokenizers

log = logging.getLogger("cepe.serving")

POLL_S = 0.2  # how often a waiting handler checks for a vanished client
GRACE_S = 1.0  # the worker reports timeouts itself; the handler steps in only if it is stuck
MAX_CONTEXT_ITEMS = 256


@dataclass
class ServeConfig:
    """Server limits. Sizes in MiB, times in seconds; see `cepe serve --help`."""

    model_name: str = "cepe"
    api_key: str | None = None
    store_dir: str = "~/.cache/cepe/store"
    store_budget_mb: float = 1024.0
    memory_cache_mb: float = 1024.0  # recently used documents kept in memory, with their cross-attention keys/values
    max_queue: int = 64
    max_batch: int = 8
    max_tokens: int = 512
    max_context_tokens: int = 65536
    max_body_mb: float = 16.0
    timeout_s: float = 120.0
    batching: str = "continuous"  # or "static" (see engine.py)
    batch_memory_mb: float = 4096.0  # a continuous batch's decoder cache and contexts
    queue_context_mb: float | None = 2048.0  # encoder states held by requests waiting to join (None: unbounded)
    cuda_graphs: str = "auto"  # continuous batching: captured decoding steps (auto: on a CUDA device)
    prefill_share: float = 0.5  # continuous batching: pacing of joins (pacing.py)
    store_format: str | None = None  # stored documents' states: None (the model's dtype), int8, fp8, bfloat16...
    worker: str = "thread"  # or "process": the model in a child process (worker_process.py)
    worker_factory: str | None = None  # process worker: "module:function" building the model there
    worker_factory_kwargs: dict | None = None
    worker_sys_path: tuple[str, ...] = ()
    kv_policy: str | None = "auto"  # cache cross-attention keys/values across decoding steps
    # the encoder eager by default here: `auto` would stall the first long upload for the ~1 min
    # compilation, in the worker thread, beside captured decoding graphs (not yet measured together)
    encoder_compile: str = "never"
    # top-k cross-attention (each token reads its k best context tokens): None keeps the adapter's
    # own setting, "off" turns it off, k turns it on (better retrieval in long contexts, worse perplexity)
    cross_attn_topk: int | str | None = None

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)


def runtime_settings(config: ServeConfig) -> dict:
    """The model's run-time settings the server sets (`apply_runtime_settings` validates them)."""
    settings: dict = {"encoder_compile": config.encoder_compile}
    if config.kv_policy:
        settings["kv_policy"] = config.kv_policy
    if config.cross_attn_topk is not None:
        settings["cross_attn_topk"] = None if config.cross_attn_topk == "off" else config.cross_attn_topk
    return settings


class Service:
    """What the routes share: model worker, document store, tokenizers, metrics."""

    def __init__(self, model, config: ServeConfig, tokenizer=None, encoder_tokenizer=None):
        self.config = config
        self.tokenizer = tokenizer or model.tokenizer
        self.encoder_tokenizer = encoder_tokenizer or model.encoder_tokenizer
        if self.tokenizer is None or self.encoder_tokenizer is None:
            raise ValueError(
                "serving needs the decoder's and the encoder's tokenizers (model.tokenizer, model.encoder_tokenizer)"
            )
        model.tokenizer, model.encoder_tokenizer = self.tokenizer, self.encoder_tokenizer
        from ..model.loading import unbounded

        unbounded(self.encoder_tokenizer)  # documents are chunked before the encoder sees them
        from ..model.configuration import apply_runtime_settings

        settings = runtime_settings(config)
        apply_runtime_settings(model.config, settings)  # validated as on load
        self.model = model.eval()
        self.metrics = Metrics()
        self.lock = threading.Lock()  # the worker's tokenizers, one call at a time (fast tokenizers are not re-entrant)
        self.text = TextTokenizers(self.tokenizer, self.encoder_tokenizer)  # the handlers' own copies
        self.store = DocumentStore(config.store_dir, model.encoder_fingerprint, int(config.store_budget_mb * 2**20),
                                   int(config.memory_cache_mb * 2**20),
                                   kv_bytes_per_token=_cross_kv_bytes_per_token(model),
                                   state_format=config.store_format)
        limits = {"max_queue": config.max_queue, "max_batch": config.max_batch, "batching": config.batching,
                  "batch_memory_bytes": int(config.batch_memory_mb * 2**20), "cuda_graphs": config.cuda_graphs,
                  "prefill_share": config.prefill_share,
                  "queue_context_bytes": None if config.queue_context_mb is None
                  else int(config.queue_context_mb * 2**20)}
        if config.worker == "process":  # `model` here only describes the one the child process builds
            from .worker_process import ProcessScheduler

            if not config.worker_factory:
                raise ValueError("worker='process' needs worker_factory ('module:function' building the model)")
            spec = {"factory": config.worker_factory, "factory_kwargs": config.worker_factory_kwargs or {},
                    "sys_path": list(config.worker_sys_path), "runtime_settings": settings,
                    "switch_interval_s": sys.getswitchinterval(), "scheduler": limits,
                    "json_logs": json_logging_on()}
            self.scheduler = ProcessScheduler(spec, self.metrics, int(config.memory_cache_mb * 2**20))
        elif config.worker == "thread":
            self.scheduler = Scheduler(Runner(model, self.tokenizer, self.lock, self.metrics), metrics=self.metrics,
                                       **limits)
        else:
            raise ValueError(f"worker must be 'thread' or 'process', got {config.worker!r}")
        width = model.encoder.hidden_size
        fmt = config.store_format
        self.bytes_per_token = 1 + (state_bytes_per_token(width, fmt) if fmt else
                                    width * next(model.encoder.parameters()).element_size())
        self.max_positions = getattr(model.config.text_config, "max_position_embeddings", None)

    # ------------------------------------------------------------------ tokens and context
    def prompt_ids(self, text: str) -> list[int]:
        limit = self.max_positions or self.config.max_body_bytes
        return self.text.prompt(text, limit, f"the decoder's {limit} positions")

    def check_prompt_chars(self, n_chars: int) -> None:
        """Refuse chat messages far too long for the decoder before the chat template copies them."""
        limit = self.max_positions or self.config.max_body_bytes
        self.text.check_chars(n_chars, limit, self.text.decoder_chars, "prompt", f"the decoder's {limit} positions",
                              "prompt_too_large")

    def check_document_chars(self, n_chars: int, what: str, code: str) -> None:
        self.text.check_chars(n_chars, self.config.max_context_tokens, self.text.encoder_chars, what,
                              "--max-context-tokens", code)

    def resolve_context(self, items: list) -> tuple[list, list[list[int]]]:
        """`context` items -> (loaded stored `ContextStates`, raw documents as encoder token ids)."""
        if len(items) > MAX_CONTEXT_ITEMS:
            raise ApiError(400, f"context has {len(items)} items; at most {MAX_CONTEXT_ITEMS}", code="context_too_many")
        texts = [i.text if isinstance(i, ContextRef) else i for i in items]
        self.check_document_chars(sum(len(t) for t in texts if t and not t.startswith(ID_PREFIX)), "context",
                                  "context_too_large")
        stored, raw, tokens = [], [], 0
        for k, item in enumerate(items):
            if isinstance(item, ContextRef):
                if (item.id is None) == (item.text is None):
                    raise ApiError(400, f"context[{k}]: give exactly one of 'id' and 'text'")
                doc_id, text = item.id, item.text
            else:
                doc_id, text = (item, None) if item.startswith(ID_PREFIX) else (None, item)
            if doc_id is not None:
                try:
                    states = self.store.get(doc_id)
                except InvalidContextId as e:
                    raise ApiError(400, f"context[{k}]: {e}", code="invalid_context_id") from e
                except KeyError as e:
                    raise ApiError(404, f"context[{k}]: no stored context {doc_id}", code="context_not_found") from e
                except CorruptContext as e:
                    raise ApiError(404, f"context[{k}]: {e}", code="context_corrupt") from e
                stored.append(states)
                tokens += states.num_tokens
            else:
                if not text.strip():
                    raise ApiError(400, f"context[{k}]: empty document")
                ids = self.text.document(text, self.config.max_context_tokens - tokens)
                raw.append(ids)
                tokens += len(ids)
            if tokens > self.config.max_context_tokens:
                raise ApiError(413, f"context exceeds {self.config.max_context_tokens} tokens (--max-context-tokens)",
                               code="context_too_large")
        return stored, raw

    # ------------------------------------------------------------------ jobs
    async def submit(self, jobs) -> None:
        """Queue `jobs` off the event loop: a process worker's submit serialises new contexts and waits
        for the child's acknowledgement, during which other requests' streams must keep flowing."""
        sent = asyncio.ensure_future(asyncio.to_thread(self.scheduler.submit, jobs))
        try:
            await asyncio.shield(sent)
        except asyncio.CancelledError:  # the handler went away mid-submit: free the jobs once queued
            sent.add_done_callback(lambda f: f.cancelled() or f.exception() or [self.scheduler.cancel(j) for j in jobs])
            raise
        except QueueFull as e:
            raise ApiError(429, str(e), "rate_limit_error", "queue_full") from e
        except ShuttingDown as e:
            raise ApiError(503, str(e), "server_error") from e

    def _job_kw(self, sink, deadline: float | None = None) -> dict:
        deadline = deadline if deadline is not None else time.monotonic() + self.config.timeout_s
        return {"sink": sink, "loop": asyncio.get_running_loop(), "deadline": deadline}

    async def events(self, request: Request, jobs, sink: asyncio.Queue):
        """Yield (index, event) until every job is done. Stops early if the client goes away;
        whatever ends the wait, unfinished jobs are cancelled (their queue slots freed)."""
        pending = {j.index for j in jobs}
        deadline = max(j.deadline for j in jobs) + GRACE_S
        next_check = time.monotonic() + POLL_S
        try:
            while pending:
                if time.monotonic() >= next_check:  # also while events flow: a long answer must notice too
                    next_check = time.monotonic() + POLL_S
                    if await request.is_disconnected():
                        return
                try:
                    idx, event = await asyncio.wait_for(sink.get(), POLL_S)
                except TimeoutError:
                    if time.monotonic() > deadline:
                        for j in jobs:
                            self.scheduler.cancel(j, "timeouts")
                        raise ApiError(
                            504, f"request timed out after {self.config.timeout_s:g} s (--timeout)", "timeout"
                        ) from None
                    continue
                if event[0] != "delta":
                    pending.discard(idx)
                yield idx, event
        finally:
            for j in jobs:
                self.scheduler.cancel(j)

    async def encode(self, request: Request, documents: list, deadline: float | None = None):
        """Run one `EncodeJob` through the queue; returns `ContextStates` (1, S, He)."""
        sink: asyncio.Queue = asyncio.Queue()
        job = EncodeJob(documents, **self._job_kw(sink, deadline))
        await self.submit([job])
        async with aclosing(self.events(request, [job], sink)) as events:
            async for _, event in events:
                if event[0] == "error":
                    raise ApiError(event[1], event[2], event[3])
                if event[0] == "done":
                    return event[1]
        raise ApiError(499, "client closed request")

    # ------------------------------------------------------------------ completions
    def check(self, req, max_tokens: int, choices: int) -> None:
        if req.model != self.config.model_name:
            raise ApiError(404, f"model {req.model!r} is not served here; available: [{self.config.model_name!r}]",
                           code="model_not_found")
        if bad := req.unsupported():
            raise ApiError(400, f"unsupported option(s): {', '.join(bad)}", code="unsupported")
        if max_tokens > self.config.max_tokens:
            raise ApiError(
                400,
                f"max_tokens {max_tokens} exceeds this server's limit {self.config.max_tokens} (--max-tokens)",
                param="max_tokens",
                code="max_tokens_too_large",
            )
        if choices > self.config.max_queue:
            raise ApiError(400, f"{choices} choices requested (prompts x n): more than the queue holds, "
                           f"{self.config.max_queue} (--max-queue)", param="n", code="too_many_choices")
        if choices > self.config.max_batch:
            raise ApiError(
                400, f"{choices} choices requested (prompts x n); at most {self.config.max_batch}", param="n"
            )
        if req.stream and choices != 1:
            raise ApiError(400, "streaming supports one prompt and n=1", param="n")
        if len(req.stop_list()) > 4:
            raise ApiError(400, "at most 4 stop sequences", param="stop")

    async def complete(self, request: Request, req, prompts: list[str], max_tokens: int, chat: bool):
        deadline = time.monotonic() + self.config.timeout_s  # encoding raw context included
        clock = RequestClock(self.metrics)
        prompt_ids = []
        for text in prompts:
            ids = await asyncio.to_thread(self.prompt_ids, text)
            if not ids:
                raise ApiError(400, "empty prompt", param="prompt")
            if self.max_positions and len(ids) + max_tokens > self.max_positions:
                raise ApiError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the decoder's "
                               f"{self.max_positions} positions", param="max_tokens", code="context_length_exceeded")
            prompt_ids.append(ids)
        contexts, cached = [], 0
        if req.context:
            contexts, raw = await asyncio.to_thread(self.resolve_context, req.context)
            cached = sum(c.num_tokens for c in contexts)  # served from the store, not encoded for this request
            if raw:  # encoded once for every choice of this request, never stored
                contexts.append(await self.encode(request, raw, deadline))
        sampling = Sampling(max_tokens, req.temperature, req.top_p, tuple(req.stop_list()), req.ignore_eos, req.seed)
        sink: asyncio.Queue = asyncio.Queue()
        kw = self._job_kw(sink, deadline)
        jobs = [GenerateJob(ids, sampling, contexts, index=i, **kw)
                for i, ids in enumerate(ids for ids in prompt_ids for _ in range(req.n))]
        await self.submit(jobs)
        rid = new_id("chatcmpl" if chat else "cmpl")
        if req.stream:
            return StreamingResponse(
                self._stream(request, jobs, sink, rid, chat, req.include_usage(), cached, clock),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        texts, reasons, usages = [""] * len(jobs), [None] * len(jobs), [None] * len(jobs)
        async with aclosing(self.events(request, jobs, sink)) as events:
            async for i, event in events:
                if event[0] == "delta":
                    texts[i] += event[1]
                    clock.delta(i)
                elif event[0] == "done":
                    reasons[i], usages[i] = event[1], event[2]
                else:
                    raise ApiError(event[1], event[2], event[3])
        if any(r is None for r in reasons):
            return error_response(499, "client closed request")
        clock.done()
        usage = self._usage(prompt_ids, usages, cached)
        build = chat_body if chat else completion_body
        return JSONResponse(build(rid, self.config.model_name, texts, reasons, usage))

    @staticmethod
    def _usage(prompt_ids: list[list[int]], usages: list[dict], cached: int) -> dict:
        """OpenAI's usage, plus `context_tokens` (encoder tokens attended); `cached_tokens`: those of
        them served from the store."""
        prompt = sum(len(p) for p in prompt_ids)
        completion = sum(u["completion_tokens"] for u in usages)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "context_tokens": usages[0]["context_tokens"] if usages else 0,
                "prompt_tokens_details": {"cached_tokens": cached}}

    async def _stream(self, request: Request, jobs, sink, rid: str, chat: bool, include_usage: bool, cached: int,
                      clock: RequestClock):
        """Server-sent events in OpenAI's chunk format, then `data: [DONE]`."""
        created, model = int(time.time()), self.config.model_name

        def sse(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        def chunk(text: str | None, reason: str | None) -> str:
            if chat:
                return sse(chat_chunk(rid, model, {} if text is None else {"content": text}, reason, created))
            return sse(completion_chunk(rid, model, text or "", reason, created))

        try:
            if chat:
                yield sse(chat_chunk(rid, model, {"role": "assistant", "content": ""}, None, created))
            async with aclosing(self.events(request, jobs, sink)) as events:
                async for _, event in events:
                    if event[0] == "delta":
                        clock.delta(0)
                        yield chunk(event[1], None)
                    elif event[0] == "done":
                        clock.done()
                        yield chunk(None, event[1])
                        if include_usage:
                            usage = self._usage([jobs[0].prompt_ids], [event[2]], cached)
                            obj = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                   "created": created, "model": model, "choices": [], "usage": usage}
                            yield sse(obj)
                    else:
                        yield sse(error_body(event[2], event[3]))
        except ApiError as e:
            yield sse(error_body(e.message, e.kind, e.code))
        yield "data: [DONE]\n\n"

    def gauges(self) -> dict[str, float]:
        return {"queue_depth": self.scheduler.depth, "running_requests": self.scheduler.running,
                "max_queue": self.config.max_queue, "store_documents": len(self.store),
                "store_bytes": self.store.total_bytes, "store_budget_bytes": self.store.budget_bytes,
                "store_memory_bytes": self.store.memory_bytes,
                "store_evictions": self.store.evictions}


def _cross_kv_bytes_per_token(model) -> int:
    """Bytes of cross-attention keys and values the model caches per context token (all layers)."""
    blocks = list(model.cross_attn.values())
    return cross_kv_bytes_per_token(blocks, blocks[0].k_proj.weight.element_size())
