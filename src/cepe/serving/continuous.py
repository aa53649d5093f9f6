"""Continuous batching (iteration-level scheduling) on the model worker.

Between any two decoding steps the worker
1. drops the rows that finished (stop, length, cancelled, timed out) -- their memory is freed and
   their slots are open at once;
2. admits waiting generation jobs from the head of the queue, in arrival order, while the batch
   stays within `--max-batch` rows and its memory stays within the budget (`--batch-memory-mb`);
3. prefills the admitted jobs as their own forward (their prompts left-padded, their contexts
   right-padded, cross-attention keys/values projected once), picks each one's first token, and
   joins them into the running batch (`decoding.Batch.join`, `RowContexts.join`);
4. runs one decoding step for every row and hands each row its token.
An encoding job at the head of the queue runs between two steps. Each row keeps its own context,
prompt, sampling (`Sampler`), stop strings, token limit, deadline and cancellation.

Memory. A running batch of B rows holds a decoder cache of B x T positions (T: the longest row,
left padding included) and a context of B x S positions (S: the widest context). Admission
counts what the batch will hold at its peak without further joins, B x ((T + the most tokens any
row may still generate) x decoder bytes + S x context bytes); joining a row is refused while that
would pass the budget (the row waits at the head of the queue). A job that cannot fit an empty
batch is answered 413 at once. So the batch never holds more than the budget.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from ..model import decoding
from ..model.stored_states import full_attention_kv_bytes_per_token
from .batch_context import RowContexts, context_bytes_per_token
from .engine import GenerateJob, Job, Runner, still_wanted
from .rows import Outbox, Row, push_tokens

if TYPE_CHECKING:
    from .engine import Scheduler

log = logging.getLogger("cepe.serving")


def decoder_bytes_per_token(model) -> int:
    """Bytes of the decoder's key/value cache per position of one row (all layers)."""
    return full_attention_kv_bytes_per_token(model.config, next(model.decoder.parameters()).element_size())


class ContinuousBatcher:
    """The worker loop of `Scheduler` under `batching="continuous"` (see the module doc)."""

    def __init__(self, scheduler: Scheduler, runner: Runner, max_batch: int, budget_bytes: int):
        self.scheduler, self.runner, self.max_batch, self.budget = scheduler, runner, max_batch, budget_bytes
        self.model, self.metrics = runner.model, runner.metrics
        self.dec_bytes = decoder_bytes_per_token(self.model)
        self.ctx_bytes = context_bytes_per_token(self.model)
        self.peak_bytes = 0  # the most the batch ever held (tests check it against the budget)
        self.outbox = Outbox()  # the rows' events of one step, delivered together
        self._reset()

    def _reset(self) -> None:
        for row in getattr(self, "rows", []):
            row.job.outbox = None
        self.rows: list = []
        self.batch = decoding.Batch(self.model, self.runner.pad_id)
        self.contexts = RowContexts(self.model, 0)
        self.tokens: torch.Tensor | None = None  # (B,) each row's last token, fed at the next step

    # ------------------------------------------------------------------ memory
    def footprint(self, rows: int, length: int, remaining: int, width: int) -> int:
        """Bytes a batch of `rows` holds at its peak: decoder cache of `length + remaining`
        positions and a context of `width` positions per row."""
        return rows * ((length + remaining) * self.dec_bytes + width * self.ctx_bytes)

    def held_bytes(self) -> int:
        """Bytes the running batch holds now: decoder cache, context states and keys/values."""
        layers = getattr(self.batch.cache, "layers", []) if self.rows else []
        cache = sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values))
        return cache + self.contexts.nbytes()

    @staticmethod
    def _width(job: GenerateJob) -> int:
        return sum(c.hidden_states.shape[1] for c in job.contexts)

    def _admitter(self):
        """A predicate over waiting jobs in queue order: True while the next one fits."""
        rows = len(self.rows)
        length, width = self.batch.length if self.rows else 0, self.contexts.width
        remaining = max((r.s.max_tokens - len(r.ids) for r in self.rows), default=0)

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

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        while True:
            jobs = self.scheduler.take_ready(self._admitter(), block=not self.rows)
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
                    self._join(jobs)
                    self.outbox.flush()  # first tokens go out before the next step runs
                if self.rows:
                    self._step()
            except Exception as e:  # keep serving: report to the rows of this batch only
                log.exception("batch failed", extra={"fields": {"event": "batch_error"}})
                for row in self.rows:
                    if not row.done:
                        row.fail(500, f"generation failed: {type(e).__name__}: {e}", "server_error")
                self._reset()
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
        t0 = time.perf_counter()
        for job in live:
            job.outbox = self.outbox
        rows = [Row(job, self.runner) for job in live]
        contexts = RowContexts.build(self.model, [job.contexts for job in live])
        joiner = decoding.Batch(self.model, self.runner.pad_id, context=contexts.context)
        logits = joiner.prefill([job.prompt_ids for job in live])
        tokens = decoding.pick(logits, [r.sampler for r in rows])
        push_tokens(rows, tokens.tolist(), self.runner.detokenizer)
        self.metrics.generated(len(rows))
        self.metrics.add("prompt_tokens", sum(len(j.prompt_ids) for j in live))
        self.metrics.add("context_tokens", sum(j.context_tokens for j in live))
        keep = [i for i, r in enumerate(rows) if not r.done]
        log.info("join", extra={"fields": {
            "event": "join", "size": len(live), "running": len(self.rows), "prompt_len": joiner.length,
            "context_len": contexts.width, "prefill_ms": round(1000 * (time.perf_counter() - t0), 1)}})
        if len(keep) < len(rows):
            self._leave(rows)
            joiner.keep(keep)
            contexts.keep(keep)
        if not keep:
            return
        self.batch.join(joiner)
        self.contexts.join(contexts)
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
        self.batch.kwargs["context"] = self.contexts.context
        logits = self.batch.step(self.tokens)
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
                self.batch.keep(keep)
                self.contexts.keep(keep)
                self.rows = [self.rows[i] for i in keep]
                tokens = tokens[keep]
            else:
                self._reset()
                return
        self.tokens = tokens
