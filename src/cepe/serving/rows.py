"""The server side of a running batch's rows: each row's text, stop strings, limits, deadline and
events, handled for all rows of a decoding step at once.

Per step and row, the worker used to decode the row's whole token list (O(tokens so far), under
the tokenizer lock, through the Python wrapper) and wake the handlers' event loop once per text
delta (a write to its self-pipe and a thread switch each). Now
- `Detokenizer` keeps each row's text incrementally: it decodes only a short window of recent
  tokens, for every row of the step in one call, and falls back to a full decode whenever the
  window is not clean text (a replacement character: an incomplete or invalid UTF-8 sequence) or
  the tokenizer cleans up spaces. The text is the same as `tokenizer.decode(ids,
  skip_special_tokens=True)` of all the row's tokens (tests/serving/test_rows.py);
- `Outbox` gathers the step's events and hands them to each event loop in one call.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from ..model import decoding

if TYPE_CHECKING:
    from .engine import GenerateJob, Runner

REPLACEMENT = "\ufffd"


class Outbox:
    """Events of one step, delivered with one wake-up per event loop instead of one per event."""

    def __init__(self) -> None:
        self._pending: dict = {}  # loop -> [(sink, item)], in emit order

    def put(self, loop, sink, item) -> None:
        self._pending.setdefault(loop, []).append((sink, item))

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for loop, items in pending.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the handler's loop is gone: nobody is listening
                pass


def _deliver(items: list) -> None:
    for sink, item in items:
        sink.put_nowait(item)


class TextState:
    """One row's ids and text. `text` is the decode of `ids[:read]`; the window `ids[prefix:]`
    starts a step earlier than `read` (at tokens that decoded to some text), so decoders that strip
    a leading space see the same first piece in both decodes, `ids[prefix:]` and `ids[prefix:read]`,
    and their difference is exactly the new text."""

    __slots__ = ("ids", "text", "prefix", "read", "current")

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.text = self.current = ""  # current: the decode of all of `ids`
        self.prefix = self.read = 0


class Detokenizer:
    """Each row's full text after its new tokens, from one batched decode of short windows."""

    def __init__(self, tokenizer, lock: threading.Lock):
        self.tokenizer, self.lock = tokenizer, lock
        backend = getattr(tokenizer, "backend_tokenizer", None)
        # a tokenizer that cleans up spaces (" ." -> ".") may change text before the window: decode in full
        self.incremental = backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self.backend = backend

    def full(self, seqs: list[list[int]]) -> list[str]:
        with self.lock:
            return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in seqs]

    def update(self, states: list[TextState]) -> None:
        """Set each state's `current` text to the decode of all its ids."""
        if not states:
            return
        slow = states
        if self.incremental:
            windows = [w for s in states for w in (s.ids[s.prefix :], s.ids[s.prefix : s.read])]
            with self.lock:
                out = self.backend.decode_batch(windows, skip_special_tokens=True)
            slow = []
            for i, s in enumerate(states):
                new, old = out[2 * i], out[2 * i + 1]
                # an empty `old` past the start may be only skipped special tokens: the window's first
                # decoded piece would then differ between the two decodes (a stripped leading space)
                if REPLACEMENT in new or not new.startswith(old) or (s.prefix and not old):
                    slow.append(s)
                    continue
                added = new[len(old) :]
                s.current = s.text = s.text + added
                if added:  # the next window starts at tokens that decode to some text
                    s.prefix = s.read
                s.read = len(s.ids)
        for s, text in zip(slow, self.full([s.ids for s in slow])):
            s.current = text
            if self.incremental and not text.endswith(REPLACEMENT):
                # a last token that is clean text alone starts with a whole character (ending any
                # invalid sequence before it) and decodes to something: the window may restart there
                last = self.backend.decode(s.ids[-1:], skip_special_tokens=True)
                if last and REPLACEMENT not in last:
                    s.text, s.prefix, s.read = text, len(s.ids) - 1, len(s.ids)


class Row:
    """One sequence of a running batch: decodes its text, applies stop strings, limits, deadline."""

    def __init__(self, job: GenerateJob, runner: Runner):
        self.job, self.runner, self.s = job, runner, job.sampling
        self.state = TextState()
        self.ids = self.state.ids
        self.sent = 0  # characters already emitted
        self.done = False
        # a generator per row: a seeded request samples the same in any batch
        self.sampler = decoding.Sampler(decoding.SamplingParams(self.s.temperature, self.s.top_p, seed=self.s.seed))

    def _flush(self, text: str, final: bool) -> None:
        safe = len(text)
        if not final:
            # hold back an incomplete UTF-8 character and anything that may begin a stop string
            while safe > self.sent and text[safe - 1] == REPLACEMENT:
                safe -= 1
            for stop in self.s.stop:
                for k in range(min(len(stop) - 1, len(text)), 0, -1):
                    if text.endswith(stop[:k]):
                        safe = min(safe, len(text) - k)
                        break
        if safe > self.sent:
            self.job.emit("delta", text[self.sent : safe])
            self.sent = safe

    def finish(self, reason: str, text: str | None = None) -> None:
        if self.done:
            return
        self.done = True
        self._flush(self.state.current if text is None else text, final=True)
        usage = {"prompt_tokens": len(self.job.prompt_ids), "completion_tokens": len(self.ids),
                 "context_tokens": self.job.context_tokens}
        self.job.emit("done", reason, usage)

    def fail(self, status: int, message: str, kind: str) -> None:
        self.done = True
        self.job.emit("error", status, message, kind)

    def take(self, token: int) -> bool:
        """Take the token sampled for this row; True when it was kept (its text is then needed)."""
        if self.done:
            return False
        if self.job.cancelled.is_set():  # counted by whoever cancelled it
            self.done = True
            return False
        if time.monotonic() > self.job.deadline:
            self.runner.metrics.add("timeouts")
            self.fail(504, f"generation timed out after {len(self.ids)} tokens", "timeout")
            return False
        if token in self.runner.eos_ids and not self.s.ignore_eos:
            self.finish("stop")
            return False
        self.ids.append(token)
        return True

    def advance(self) -> None:
        """After `take` and the text update: stop strings, the token limit, the next delta."""
        text = self.state.current
        hits = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.s.stop) if i >= 0]
        if hits:
            return self.finish("stop", text[: min(hits)])
        if len(self.ids) >= self.s.max_tokens:
            return self.finish("length", text)
        self._flush(text, final=False)


def push_tokens(rows: list[Row], tokens: list[int], detokenizer: Detokenizer) -> None:
    """Hand each row its token; the texts of all rows that kept one come from one decode call."""
    taking = [row for row, token in zip(rows, tokens) if row.take(token)]
    detokenizer.update([row.state for row in taking])
    for row in taking:
        row.advance()
