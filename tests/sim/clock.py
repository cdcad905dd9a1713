"""The simulated clock: a heap of timed events.  Time moves only when an event is taken, to
that event's time, so a quiet cluster costs nothing between its events."""

from __future__ import annotations

import heapq
import itertools
from typing import Any

#: Event kinds, in the order they are handled when two fall on the same instant and were
#: queued in the same order (the sequence number breaks ties first: first queued, first run).
WAKE, DELIVER, CALL = 0, 1, 2

Item = tuple[float, int, int, Any, Any]


class Clock:
    """``now`` is the time of the last event taken; events are (time, seq, kind, a, b)."""

    def __init__(self, start: float = 0.0):
        self.now = start
        self.heap: list[Item] = []
        self._seq = itertools.count()

    def at(self, when: float, kind: int, a: Any = None, b: Any = None) -> None:
        """Queue an event; one in the past runs at ``now`` (time never goes back)."""
        heapq.heappush(self.heap, (max(when, self.now), next(self._seq), kind, a, b))

    def next_time(self) -> float | None:
        return self.heap[0][0] if self.heap else None

    def pop(self) -> Item:
        item = heapq.heappop(self.heap)
        self.now = item[0]
        return item

    def __len__(self) -> int:
        return len(self.heap)
