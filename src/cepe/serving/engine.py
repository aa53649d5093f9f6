"""The model worker: a bounded queue of jobs and one thread that runs the model.

HTTP handlers never touch the model. They turn a request into jobs (one per completion choice,
or one per document to encode), `submit` them, and read the job's events (text deltas, then
`done` or `error`) from an asyncio queue. One worker thread takes jobs in arrival order and runs
them; a full queue refuses new jobs at once (the handler answers 429).

Batching is `continuous` (the default; `continuous.py`: rows join and leave the running batch
between decoding steps, within a memory budget) or `static`: when the worker takes a generation
job it also takes every waiting generation job in the same context-size bucket (no context, or the
same power of two of context tokens), up to `max_batch`. Prompts are left-padded into one batch and
contexts right-padded into one `ContextStates`; each row keeps its own sampling settings, stop
strings, token limit, deadline and cancellation, and is answered the moment it finishes. Requests
that arrive while a static batch runs wait for the next one; after a batch, the worker waits up to
50 ms for its clients' next requests, so clients answered together keep sharing batches. Encoding
jobs run one at a time.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..model import decoding
from ..model.context import ContextStates
from .rows import Detokenizer, Outbox, Row, push_tokens

log = logging.getLogger("cepe.serving")

ENCODE_CHUNKS_PER_PASS = 64  # encoder passes over at most this many chunks (bounds peak memory)


def still_wanted(jobs: list, metrics) -> list:
    """The jobs still worth running: cancelled ones are dropped, and those past their deadline are
    answered 504 (and counted) here, before any model work."""
    now, live = time.monotonic(), []
    for job in jobs:
        if job.cancelled.is_set():
            continue
        if now > job.deadline:
            metrics.add("timeouts")
            job.emit("error", 504, "request timed out while queued", "timeout")
        else:
            live.append(job)
    return live


class QueueFull(Exception):
    """The bounded queue has no room (HTTP 429)."""


class ShuttingDown(Exception):
    """The server is stopping (HTTP 503)."""


@dataclass
class Sampling:
    """Per-request decoding settings (OpenAI semantics: temperature 0 is greedy)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None


class Job:
    """One unit of model work. Events go to `sink` (an asyncio queue of the handler's loop) as
    `(index, event)`: `("delta", text)`, `("done", payload...)` or `("error", status, message)`."""

    kind = "job"

    def __init__(self, sink: asyncio.Queue, loop: asyncio.AbstractEventLoop, deadline: float, index: int = 0):
        self.sink, self.loop, self.deadline, self.index = sink, loop, deadline, index
        self.cancelled = threading.Event()
        self.finished = False
        self.enqueued = time.monotonic()
        self.outbox: Outbox | None = None  # set by a batcher that delivers a step's events together

    def emit(self, *event: Any) -> None:
        if event[0] in ("done", "error"):
            self.finished = True
        if self.outbox is not None:
            return self.outbox.put(self.loop, self.sink, (self.index, event))
        try:
            self.loop.call_soon_threadsafe(self.sink.put_nowait, (self.index, event))
        except RuntimeError:  # the handler's loop is gone: nobody is listening
            pass

    def batch_key(self) -> tuple:
        return (self.kind, id(self))  # batches only with itself


class EncodeJob(Job):
    """Encode documents (strings or encoder token-id lists) into one example's `ContextStates`
    (1, S, He); `done` carries it."""

    kind = "encode"

    def __init__(self, documents: list, **kw):
        super().__init__(**kw)
        self.documents = documents


class GenerateJob(Job):
    """Complete one prompt, cross-attending to `contexts` (encoded `ContextStates`, each (1, S_i, He),
    joined). `done` carries (finish_reason, usage)."""

    kind = "generate"

    def __init__(self, prompt_ids: list[int], sampling: Sampling, contexts: list[ContextStates] = (), **kw):
        super().__init__(**kw)
        self.prompt_ids, self.sampling, self.contexts = list(prompt_ids), sampling, list(contexts)
        self.context_tokens = sum(c.num_tokens for c in self.contexts)

    def batch_key(self) -> tuple:
        # padding every row to the longest context costs compute per row: batch similar sizes only
        return ("generate", int(self.context_tokens).bit_length())


def states_nbytes(c: ContextStates) -> int:
    """Bytes of a context's encoder states alone (what a queue holds or a pipe carries)."""
    return c.hidden_states.numel() * c.hidden_states.element_size()


def context_bytes(jobs, seen: dict[int, int] | None = None) -> dict[int, int]:
    """The encoder states the jobs hold, id -> bytes, each `ContextStates` once (the choices of one
    request, and requests reading the same stored document, share them); added to `seen` if given."""
    seen = {} if seen is None else seen
    for job in jobs:
        for c in getattr(job, "contexts", ()):
            seen[id(c)] = states_nbytes(c)
    return seen


class Scheduler:
    """A bounded FIFO of jobs served by one worker thread that calls `runner.run(batch)`."""

    def __init__(self, runner: Runner, max_queue: int, max_batch: int, metrics, batch_window_s: float = 0.05,
                 batching: Literal["static", "continuous"] = "static", batch_memory_bytes: int = 2**32,
                 cuda_graphs: str = "auto", prefill_share: float = 0.5, queue_context_bytes: int | None = None):
        if batching not in ("static", "continuous"):
            raise ValueError(f"batching must be 'static' or 'continuous', got {batching!r}")
        self.runner, self.max_queue, self.max_batch, self.metrics = runner, max_queue, max_batch, metrics
        self.batching, self.batch_memory_bytes, self.cuda_graphs = batching, batch_memory_bytes, cuda_graphs
        self.prefill_share = prefill_share  # continuous batching: pacing of joins (pacing.py)
        # encoder states held by waiting jobs (raw contexts encoded for them, stored ones they read): the
        # batch's budget counts contexts only once they join, so this bounds them before (None: unbounded)
        self.queue_context_bytes = queue_context_bytes
        self.batcher = None  # the ContinuousBatcher, under continuous batching
        self.batch_window_s = batch_window_s
        self._last_end = 0.0  # when the last generation batch finished
        self._expected = 1  # jobs likely waiting by then: that batch's clients come back, plus those queued
        self._waiting: deque[Job] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self.running = 0
        self._thread: threading.Thread | None = None

    @property
    def depth(self) -> int:
        return len(self._waiting)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def start(self) -> None:
        target = self._loop
        if self.batching == "continuous":
            from .continuous import ContinuousBatcher

            self.batcher = ContinuousBatcher(self, self.runner, self.max_batch, self.batch_memory_bytes,
                                             self.cuda_graphs, self.prefill_share)
            target = self.batcher.run
        self._thread = threading.Thread(target=target, name="cepe-model-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), deque()
            self._cv.notify_all()
        for job in waiting:
            job.emit("error", 503, "server is shutting down", "server_error")
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, jobs: list[Job]) -> None:
        """Queue all of `jobs` or none of them."""
        with self._cv:
            if self._stopping:
                raise ShuttingDown("server is shutting down")
            if len(self._waiting) + len(jobs) > self.max_queue:
                self.metrics.add("rejected")  # one request, however many jobs
                raise QueueFull(f"queue full ({len(self._waiting)} waiting, limit {self.max_queue}): retry later")
            if self.queue_context_bytes is not None and self._waiting:  # alone, a request always gets in
                waiting = context_bytes(self._waiting)
                held = sum(waiting.values())
                total = sum(context_bytes(jobs, waiting).values())
                if total > self.queue_context_bytes and total > held:  # a request adding nothing still gets in
                    self.metrics.add("rejected")
                    raise QueueFull(f"waiting requests hold {held / 2**20:.0f} MiB of context, and this one's would "
                                    f"pass the {self.queue_context_bytes / 2**20:.0f} MiB limit (--queue-context-mb): "
                                    "retry later")
            self._waiting.extend(jobs)
            self._cv.notify()

    def cancel(self, job: Job, reason: str = "cancelled") -> None:
        """The client went away (or its time ran out): drop a waiting job now, or stop a running
        one at its next token. `reason` names the counter ("cancelled" or "timeouts")."""
        if job.finished or job.cancelled.is_set():
            return
        job.cancelled.set()
        self.metrics.add(reason)
        with self._cv:
            try:
                self._waiting.remove(job)
            except ValueError:
                return
        job.finished = True

    def take_ready(self, admit: Callable[[Job], bool], block: bool) -> list[Job] | None:
        """Continuous batching: jobs to start now, from the head of the queue in arrival order
        (None: stopping). An encoding job at the head comes alone; otherwise generation jobs
        while `admit(job)` says they fit. `block`: wait for a first job (the batch is idle)."""
        with self._cv:
            while block and not self._waiting and not self._stopping:
                self._cv.wait()
            if self._stopping:
                return None
            taken: list[Job] = []
            while self._waiting:
                head = self._waiting[0]
                if head.kind != "generate":
                    if not taken:
                        taken.append(self._waiting.popleft())
                    break
                if not admit(head):
                    break
                taken.append(self._waiting.popleft())
            return taken

    def run_alone(self, job: Job) -> None:
        """Run one (encoding) job between decoding steps, reporting a failure to it alone."""
        if job.cancelled.is_set():
            return
        if time.monotonic() > job.deadline:
            self.metrics.add("timeouts")
            return job.emit("error", 504, "request timed out while queued", "timeout")
        try:
            self.runner.run([job], should_stop=lambda: self._stopping)
        except Exception as e:
            log.exception("job failed", extra={"fields": {"event": "batch_error"}})
            job.emit("error", 500, f"{job.kind} failed: {type(e).__name__}: {e}", "server_error")

    def _take(self) -> list[Job] | None:
        with self._cv:
            while True:
                while not self._waiting and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return None
                head = self._waiting[0]
                # clients answered by the last batch usually ask again within milliseconds: give them
                # a short window to join, or groups of clients fall out of step and never share a batch
                left = self._last_end + self.batch_window_s - time.monotonic()
                if head.kind != "generate" or left <= 0 or len(self._compatible(head)) >= self._expected:
                    break
                self._cv.wait(left)
            batch = self._compatible(head)[: self.max_batch] if head.kind == "generate" else [head]
            for job in batch:
                self._waiting.remove(job)
            self.running = len(batch)
            return batch

    def _compatible(self, head: Job) -> list[Job]:
        key = head.batch_key()
        return [job for job in self._waiting if job.batch_key() == key]

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            live = still_wanted(batch, self.metrics)
            try:
                if live:
                    self.runner.run(live, should_stop=lambda: self._stopping)
            except Exception as e:  # keep serving: report to this batch only
                log.exception("batch failed", extra={"fields": {"event": "batch_error"}})
                for job in live:
                    if not job.finished:
                        job.emit("error", 500, f"generation failed: {type(e).__name__}: {e}", "server_error")
            finally:
                if batch[0].kind == "generate":
                    with self._cv:
                        self._expected = min(self.max_batch, len(batch) + len(self._waiting))
                        self._last_end = time.monotonic()
                self.running = 0


class Runner:
    """Runs the model for the worker: encodes documents and decodes batches token by token."""

    def __init__(self, model, tokenizer, tokenizer_lock: threading.Lock, metrics):
        self.model, self.tokenizer, self.lock, self.metrics = model, tokenizer, tokenizer_lock, metrics
        eos = set()
        for src in (
            getattr(tokenizer, "eos_token_id", None),
            getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        ):
            eos.update(src if isinstance(src, (list, tuple)) else [src] if src is not None else [])
        self.eos_ids = eos
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (min(eos) if eos else 0)
        self.detokenizer = Detokenizer(tokenizer, tokenizer_lock)

    def run(self, jobs: list[Job], should_stop: Callable[[], bool] = lambda: False) -> None:
        if jobs[0].kind == "encode":
            for job in jobs:
                job.emit("done", self.encode(job.documents))
        else:
            self.generate(jobs, should_stop)

    @torch.no_grad()
    def encode(self, documents: list) -> ContextStates:
        """Documents (strings or encoder token-id lists) -> one example's `ContextStates` (1, S, He),
        encoded in slices of chunks."""
        t0 = time.perf_counter()
        with self.lock:
            ids, mask = self.model.tokenize_context(list(documents))  # (1, N, L)
        dev = self.model.device
        parts = [
            self.model.encode(
                ids[:, i : i + ENCODE_CHUNKS_PER_PASS].to(dev), mask[:, i : i + ENCODE_CHUNKS_PER_PASS].to(dev)
            )
            for i in range(0, ids.shape[1], ENCODE_CHUNKS_PER_PASS)
        ]
        states = ContextStates.concat(parts) if len(parts) > 1 else parts[0]
        self.metrics.add("encoded_tokens", int(mask.sum()))
        self.metrics.add("encode_seconds", time.perf_counter() - t0)
        return states

    def _batch_context(self, jobs: list[GenerateJob]) -> ContextStates | None:
        """Each job's contexts joined, then right-padded into one (B, S_max, He) batch. When every
        job reads the same single (stored) context, that very object is used: the model caches its
        cross-attention keys/values inside it, for this batch and for later requests."""
        first = jobs[0].contexts
        if len(first) == 1 and all(len(j.contexts) == 1 and j.contexts[0] is first[0] for j in jobs):
            shared = first[0]
            return shared if shared.hidden_states.device == self.model.device else shared.to(self.model.device)
        per_job = [ContextStates.concat(job.contexts) if job.contexts else None for job in jobs]
        # on the model's device once, so the cross-attention key/value cache survives every step
        return ContextStates.stack_padded(per_job, self.model.device)

    @torch.no_grad()
    def generate(self, jobs: list[GenerateJob], should_stop: Callable[[], bool]) -> None:
        rows = [Row(job, self) for job in jobs]
        context = self._batch_context(jobs)
        b, t = len(jobs), max(len(j.prompt_ids) for j in jobs)
        batch = decoding.Batch(self.model, self.pad_id, context=context)
        t0 = time.perf_counter()
        logits = batch.prefill([j.prompt_ids for j in jobs])  # left-padded: every row's next token is last
        t_prefill = time.perf_counter() - t0
        steps, outbox = 0, Outbox()
        for job in jobs:
            job.outbox = outbox  # a step's deltas reach the handlers' loop in one wake-up
        try:
            for _ in range(max(j.sampling.max_tokens for j in jobs)):
                tokens = decoding.pick(logits, [None if r.done else r.sampler for r in rows])
                live = sum(not r.done for r in rows)
                push_tokens(rows, tokens.tolist(), self.detokenizer)
                outbox.flush()
                self.metrics.generated(live)
                steps += 1
                if should_stop():
                    for row in rows:
                        if not row.done:
                            row.fail(503, "server is shutting down", "server_error")
                if all(r.done for r in rows):
                    break
                logits = batch.step(tokens)
            for row in rows:
                row.finish("length")
        finally:
            for job in jobs:
                job.outbox = None
            outbox.flush()
        elapsed = time.perf_counter() - t0
        self.metrics.add("batches")
        self.metrics.add("batched_requests", b)
        self.metrics.add("prompt_tokens", sum(len(j.prompt_ids) for j in jobs))
        self.metrics.add("context_tokens", sum(j.context_tokens for j in jobs))
        log.info(
            "batch",
            extra={
                "fields": {"event": "batch", "size": b, "prompt_len": t,
                           "context_len": 0 if context is None else context.hidden_states.shape[1], "steps": steps,
                           "prefill_ms": round(1000 * t_prefill, 1), "total_ms": round(1000 * elapsed, 1),
                           "new_tokens": sum(len(r.ids) for r in rows)}
            },
        )
