"""`HotCache`: the store's recently used documents kept in memory, least recently used first, within a
byte budget.

A document's cost grows after it is handed out, as the model caches cross-attention keys/values in
the object. Re-reading every hot document's cost at every read, as the store first did, made a read
O(documents hot) under the store's lock: with ~1,000 documents hot, ~10 ms a read, ~200 ms for a
request naming 20 documents, and requests resolved one at a time (a RAG load capped at ~6 requests/s
however many clients). Here each document's cost is recorded when it is kept, and all are re-read once
every len(cache) reads: amortised O(1) a read, and a growth is seen within that many reads.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any


class HotCache:
    """hex id -> (states, recorded cost); `cost(states)`: the bytes a kept document holds now."""

    def __init__(self, budget_bytes: int, cost: Callable[[Any], int]):
        self.budget, self.cost = budget_bytes, cost
        self.items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self.total = 0  # the recorded costs' sum
        self._reads = 0  # since the last re-read of every cost

    def __len__(self) -> int:
        return len(self.items)

    def get(self, hex_id: str):
        item = self.items.get(hex_id)
        return None if item is None else item[0]

    def pop(self, hex_id: str, default=None):
        item = self.items.pop(hex_id, None)
        if item is None:
            return default
        self.total -= item[1]
        return item[0]

    def keep_only(self, hex_ids) -> None:
        """Drop the documents not in `hex_ids` (removed from the folder)."""
        for hex_id in [h for h in self.items if h not in hex_ids]:
            self.pop(hex_id)

    def nbytes(self) -> int:
        """Bytes held now (every cost re-read)."""
        return sum(self.cost(s) for s, _ in self.items.values())

    def keep(self, hex_id: str, states) -> None:
        """Keep `states` as the most recently used, then drop the least recently used while over budget."""
        self.pop(hex_id)
        cost = self.cost(states)
        if cost > self.budget:
            return  # does not fit at all: served from disk each time
        self._reads += 1
        if self._reads >= len(self.items):  # re-read every cost: the model may have cached in them since
            self._reads = 0
            self.items = OrderedDict((h, (s, self.cost(s))) for h, (s, _) in self.items.items())
            self.total = sum(c for _, c in self.items.values())
        self.items[hex_id] = (states, cost)
        self.total += cost
        while self.total > self.budget:
            self.total -= self.items.popitem(last=False)[1][1]
