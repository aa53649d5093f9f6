"""Continuous batching (iteration-level scheduling) on the model worker.

Between any two decoding steps the worker
1. drops the rows that finished (stop, length, cancelled, timed out) -- their memory is freed and
   their slots are open at once;
2. admits waiting generation jobs from the head of the queue, in arrival order, while the batch
   stays within `--max-batch` rows and its memory stays within the budget (`--batch-memory-mb`),
   when a join is due (`pacing.JoinPacer`, `--prefill-share`: joins are paced so that prefills of
   a few rows each do not take most of the worker's time);
3. prefills the admitted jobs as their own forward (their prompts left-padded, their contexts
   right-padded, cross-attention keys/values projected once), picks each one's first token, and
   joins them into the running batch (`decoding.Batch.join`, `RowContexts.join`);
4. runs one decoding step for every row and hands each row its token.
An encoding job at the head of the queue runs between two steps. Each row keeps its own context,
prompt, sampling (`Sampler`), stop strings, token limit, deadline and cancellation.

The running batch is held one of two ways (`--cuda-graphs`): `EagerRows`, a `decoding.Batch` and
`RowContexts` whose tensors are re-made as rows join and leave, each step run eagerly; or a
`StaticBatch` (`static_batch.py`), fixed buffers bucketed by rows, decoder columns and context
positions, whose step is captured as a CUDA graph and replayed (`captured.py`).

Memory. A running batch of B rows holds a decoder cache of B x T positions (T: the longest row,
left padding included) and a context of B x S positions (S: the widest context). Admission
counts what the batch will hold at its peak without further joins, B x ((T + the most tokens any
row may still generate) x decoder bytes + S x context bytes) -- for a `StaticBatch`, the buffers
of that shape's bucket (B, T and S rounded up, padding included); joining a row is refused while
that would pass the budget (the row waits at the head of the queue). A job that cannot fit an
empty batch is answered 413 at once. So the batch never holds more than the budget.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from ..model import decoding
from ..model.stored_states import full_attention_kv_bytes_per_token
from .batch_context import RowContexts, context_bytes_per_token
from .captured import StepGraphs, use_graphs
from .engine import GenerateJob, Job, Runner, still_wanted
from .pacing import JoinPacer
from .rows import Outbox, Row, push_tokens
from .static_batch import StaticBatch, supported

if TYPE_CHECKING:
    from .engine import Scheduler

log = logging.getLogger("cepe.serving")


def decoder_bytes_per_token(model) -> int:
    """Bytes of the decoder's key/value cache per position of one row (all layers)."""
    return full_attention_kv_bytes_per_token(model.config, next(model.decoder.parameters()).element_size())


class EagerRows:
    """The running batch as a `decoding.Batch` and its `RowContexts`, stepped eagerly."""

    def __init__(self, model, pad_id: int):
        self.batch, self.contexts = decoding.Batch(model, pad_id), RowContexts(model, 0)
        self.dec_bytes, self.ctx_bytes = decoder_bytes_per_token(model), context_bytes_per_token(model)

    @property
    def size(self) -> int:
        return self.contexts.size

    @property
    def length(self) -> int:
        return self.batch.length

    @property
    def width(self) -> int:
        return self.contexts.width

    def footprint(self, rows: int, length: int, remaining: int, width: int) -> int:
        """Bytes a batch of `rows` holds at its peak: decoder cache of `length + remaining`
        positions and a context of `width` positions per row."""
        return rows * ((length + remaining) * self.dec_bytes + width * self.ctx_bytes)

    def nbytes(self) -> int:
        """Bytes held now: decoder cache, context states and keys/values."""
        layers = getattr(self.batch.cache, "layers", []) if self.size else []
        cache = sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values))
        return cache + self.contexts.nbytes()

    def join(self, joiner: decoding.Batch, contexts: RowContexts, columns: int) -> None:
        self.batch.join(joiner)
        self.contexts.join(contexts)

    def keep(self, indices: list[int]) -> None:
        self.batch.keep(indices)
        self.contexts.keep(indices)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.batch.kwargs["context"] = self.contexts.context
        return self.batch.step(tokens)


class _JoinClock:
    """A join's two parts, contexts (joined, padded, keys/values projected) and prefill, as the device
    ran them: CUDA events on a GPU (read after the join's own synchronisation, so no extra one),
    wall time elsewhere. Beside the join's wall time, this tells launch-bound joins from busy ones."""

    def __init__(self, model):
        self.cuda = next(model.parameters()).device.type == "cuda"
        self.marks = [self._now()]

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def mark(self) -> None:
        self.marks.append(self._now())

    def split(self) -> dict:
        """{"contexts_ms", "prefill_device_ms"}: after the join's tokens reached the host."""
        a, b, c = self.marks
        if self.cuda:
            c.synchronize()
            return {"contexts_ms": round(a.elapsed_time(b), 2), "prefill_device_ms": round(b.elapsed_time(c), 2)}
        return {"contexts_ms": round(1000 * (b - a), 2), "prefill_device_ms": round(1000 * (c - b), 2)}


class ContinuousBatcher:
    """The worker loop of `Scheduler` under `batching="continuous"` (see the module doc).
    `cuda_graphs`: "auto" | "on" | "off" (`captured.use_graphs`)."""

    def __init__(self, scheduler: Scheduler, runner: Runner, max_batch: int, budget_bytes: int,
                 cuda_graphs: str = "auto", prefill_share: float = 0.5):
        self.scheduler, self.runner, self.max_batch, self.budget = scheduler, runner, max_batch, budget_bytes
        self.pacer = JoinPacer(prefill_share)
        self.model, self.metrics = runner.model, runner.metrics
        device = next(self.model.parameters()).device
        self.static = use_graphs(cuda_graphs, device) and supported(self.model)
        if use_graphs(cuda_graphs, device) and not self.static:
            log.warning("captured steps need full attention in every decoder layer: decoding eagerly",
                        extra={"fields": {"event": "cuda_graphs_off"}})
        if self.static:
            graphs = StepGraphs(capture_graphs=device.type == "cuda", metrics=self.metrics)
            self.running = StaticBatch(self.model, max_batch, budget_bytes, graphs)
        self.peak_bytes = 0  # the most the batch ever held (tests check it against the budget)
        self.outbox = Outbox()  # the rows' events of one step, delivered together
        self._reset()

    def _reset(self, failed: bool = False) -> None:
        """No rows. A static batch keeps its buffers and graphs for the next rows, unless a failure
        left them in doubt."""
        for row in getattr(self, "rows", []):
            row.job.outbox = None
        self.rows: list = []
        if not self.static:
            self.running = EagerRows(self.model, self.runner.pad_id)
        elif failed:
            self.running.release()
        else:
            self.running.clear()
        self.tokens: torch.Tensor | None = None  # (B,) each row's last token, fed at the next step

    # ------------------------------------------------------------------ memory
    def footprint(self, rows: int, length: int, remaining: int, width: int) -> int:
        """Bytes a batch of `rows` holds at its peak (`EagerRows.footprint`, `StaticBatch.footprint`)."""
        return self.running.footprint(rows, length, remaining, width)

    def held_bytes(self) -> int:
        """Bytes the running batch holds now."""
        return self.running.nbytes()

    @staticmethod
    def _width(job: GenerateJob) -> int:
        return sum(c.hidden_states.shape[1] for c in job.contexts)

    def _admitter(self):
        """A predicate over waiting jobs in queue order: True while the next one fits."""
        rows = len(self.rows)
        length, width = self.running.length, self.running.width
        remaining = self._remaining()

        def admit(job: Job) -> bool:
            nonlocal rows, length, width, remaining
            if rows >= self.max_batch:
                return False
            size = (
                max(length, len(job.prompt_ids)),
                max(remaining, job.sampling.max_tokens),
                max(width, self._width(job)),
            )
            if self.footprint(rows + 1, *size) > self.budget and rows > 0:
                return False  # waits until rows leave; an empty batch takes it (and refuses it if it is alone too big)
            rows += 1
            length, remaining, width = size
            return True

        return admit

    def _remaining(self) -> int:
        return max((r.s.max_tokens - len(r.ids) for r in self.rows), default=0)

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        while True:
            if self.pacer.due(time.perf_counter(), len(self.rows), self.scheduler.depth):
                jobs = self.scheduler.take_ready(self._admitter(), block=not self.rows)
            else:  # joins are paced (pacing.py): the running rows decode on
                jobs = None if self.scheduler.stopping else []
            if jobs is None:  # stopping
                for row in self.rows:
                    row.fail(503, "server is shutting down", "server_error")
                self.outbox.flush()
                return
            if jobs and jobs[0].kind != "generate":
                self.scheduler.run_alone(jobs[0])
                continue
            try:
                if jobs:
                    t0 = time.perf_counter()
                    self._join(jobs)
                    self.outbox.flush()  # first tokens go out before the next step runs
                    self.pacer.joined(t0, time.perf_counter())
                if self.rows:
                    self._step()
            except Exception as e:  # keep serving: report to the rows of this batch only
                log.exception("batch failed", extra={"fields": {"event": "batch_error"}})
                for row in self.rows:
                    if not row.done:
                        row.fail(500, f"generation failed: {type(e).__name__}: {e}", "server_error")
                self._reset(failed=True)
            finally:
                self.outbox.flush()
            self.scheduler.running = len(self.rows)

    @torch.no_grad()
    def _join(self, jobs: list[GenerateJob]) -> None:
        live = []
        for job in still_wanted(jobs, self.metrics):
            # an empty batch that cannot hold the request alone will never hold it: refuse at once
            if not self.rows and (need := self.footprint(1, len(job.prompt_ids), job.sampling.max_tokens,
                                                         self._width(job))) > self.budget:
                job.emit("error", 413, f"this request needs {need / 2**20:.1f} MiB of batch memory (decoder cache and "
                         f"context), more than the {self.budget / 2**20:.1f} MiB budget (--batch-memory-mb)",
                         "invalid_request_error", "request_too_large")
            else:
                live.append(job)
        if not live:
            return
        t0, t0_mono = time.perf_counter(), time.monotonic()
        clock = _JoinClock(self.model)
        for job in live:
            job.outbox = self.outbox
        rows = [Row(job, self.runner) for job in live]
        contexts = RowContexts.build(self.model, [job.contexts for job in live])
        clock.mark()
        joiner = decoding.Batch(self.model, self.runner.pad_id, context=contexts.context)
        logits = joiner.prefill([job.prompt_ids for job in live])
        tokens = decoding.pick(logits, [r.sampler for r in rows])
        clock.mark()
        push_tokens(rows, tokens.tolist(), self.runner.detokenizer)
        self.metrics.generated(len(rows))
        self.metrics.add("prompt_tokens", sum(len(j.prompt_ids) for j in live))
        self.metrics.add("context_tokens", sum(j.context_tokens for j in live))
        keep = [i for i, r in enumerate(rows) if not r.done]
        log.info("join", extra={"fields": {
            "event": "join", "size": len(live), "running": len(self.rows), "prompt_len": joiner.length,
            "context_len": contexts.width, "prefill_ms": round(1000 * (time.perf_counter() - t0), 1),
            "wait_ms": round(1000 * max(t0_mono - j.enqueued for j in live), 1), **clock.split()}})
        if len(keep) < len(rows):
            self._leave(rows)
            joiner.keep(keep)
            contexts.keep(keep)
        if not keep:
            return
        # the decoder columns the batch needs at its peak, as admission counted them
        columns = max(self.running.length, joiner.length) + max(
            self._remaining(), max(job.sampling.max_tokens for job in live))
        self.running.join(joiner, contexts, columns)
        self.rows += [rows[i] for i in keep]
        self.tokens = (
            tokens[keep] if self.tokens is None else torch.cat([self.tokens, tokens[keep].to(self.tokens.device)])
        )
        self.peak_bytes = max(self.peak_bytes, self.held_bytes())

    @staticmethod
    def _leave(rows: list[Row]) -> None:
        """Finished rows' jobs emit directly again (their last events are already in the outbox)."""
        for row in rows:
            if row.done:
                row.job.outbox = None

    @torch.no_grad()
    def _step(self) -> None:
        logits = self.running.step(self.tokens)
        self.peak_bytes = max(self.peak_bytes, self.held_bytes())
        tokens = decoding.pick(logits, [r.sampler for r in self.rows])
        push_tokens(self.rows, tokens.tolist(), self.runner.detokenizer)
        self.metrics.generated(len(self.rows))
        self.metrics.add("batches")
        self.metrics.add("batched_requests", len(self.rows))
        if self.scheduler.stopping:
            for row in self.rows:
                if not row.done:
                    row.fail(503, "server is shutting down", "server_error")
        keep = [i for i, r in enumerate(self.rows) if not r.done]
        if len(keep) < len(self.rows):
            self._leave(self.rows)
            log.info(
                "leave",
                extra={
                    "fields": {"event": "leave", "size": len(self.rows) - len(keep), "running": len(keep),
                               "new_tokens": sum(len(r.ids) for r in self.rows if r.done)}
                },
            )
            if keep:
                self.running.keep(keep)
                self.rows = [self.rows[i] for i in keep]
                tokens = tokens[keep]
            else:
                self._reset()
                return
        self.tokens = tokens
