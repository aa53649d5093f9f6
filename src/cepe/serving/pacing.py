"""When the continuous batcher lets waiting requests join the running batch.

A join prefills the newcomers eagerly: on a GPU host that is ~1,300 kernel launches for SmolLM2
with its cross-attention, ~40-60 ms whether 1 or 30 rows join, while a captured decoding step of
the running rows takes ~8 ms (docs/serving.md). Joining at every step, as requests trickle in one
by one, spends most of the worker's time in prefills of one row each and stalls the running rows
for each. So joins are paced, as Hugging Face TGI's router paces them (`waiting_served_ratio`,
`max_waiting_tokens`), but by measured time instead of token counts:

- an idle batch takes waiting requests at once;
- so does a batch with at least as many requests waiting as rows running (half the slots would
  otherwise idle);
- otherwise a join waits until the rows have decoded for `(1 - share) / share` times as long as the
  last join took, so joins take at most about `share` of the worker's time, and never longer than
  `max_wait_s` (a slow join must not starve the queue).

`share = 1` joins at every step (no pacing).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class JoinPacer:
    """share: the largest fraction of the worker's time joins may take while rows decode, in (0, 1].
    max_wait_s: the longest a waiting request is held back by pacing."""

    share: float = 0.5
    max_wait_s: float = 0.25
    last_join_s: float = 0.0  # how long the last join took
    last_join_end: float = float("-inf")  # when it ended (time.perf_counter)

    def __post_init__(self) -> None:
        if not 0 < self.share <= 1:
            raise ValueError(f"prefill share must be in (0, 1], got {self.share}")
        if self.max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {self.max_wait_s}")

    def due(self, now: float, running: int, waiting: int) -> bool:
        """Whether waiting requests may join now (`running` rows decoding, `waiting` queued jobs)."""
        if running == 0:
            return True
        if waiting == 0:
            return False
        if waiting >= running:
            return True
        wait = min(self.max_wait_s, self.last_join_s * (1 - self.share) / self.share)
        return now - self.last_join_end >= wait

    def joined(self, start: float, end: float) -> None:
        """Record a join that ran from `start` to `end` (time.perf_counter)."""
        self.last_join_s, self.last_join_end = max(0.0, end - start), end
