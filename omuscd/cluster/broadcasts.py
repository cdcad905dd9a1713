"""The transmit-limited queue of membership changes piggybacked on SWIM's datagrams.

Each change (a node alive at an incarnation, suspect, dead, left) is sent a limited number
of times, retransmit_mult * ceil(log10(n + 1)) as memberlist does: infection-style
dissemination reaches every member in O(log n) rounds with high probability, so a change
costs each node O(log n) sends and a quiet cluster sends none.  The least-sent and newest
changes go first, within a byte budget per datagram; a newer change about a node replaces
the older one still queued (it is what counts now).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omuscd import wire

#: Changes kept at most; past it the most-sent are dropped (push-pull repairs the rest).
MAX_QUEUED = 4096
TAKE_AT_MOST = 64  # changes looked at for one datagram (more never fit)


def record_size(record: dict[str, Any]) -> int:
    """Bytes the record takes in a JSON body (with its separating comma)."""
    return len(wire.COMPACT.encode(record)) + 1


def retransmit_limit(mult: int, n: int) -> int:
    return max(1, mult * math.ceil(math.log10(n + 1)))


@dataclass
class _Item:
    record: dict[str, Any]
    size: int
    order: int  # larger = newer
    sent: int = 0


class TransmitQueue:
    """Changes waiting to be piggybacked, at most one per node id."""

    def __init__(self) -> None:
        self._items: dict[int, _Item] = {}
        self._order = 0

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def push(self, node_id: int, record: dict[str, Any]) -> None:
        """Queue a change about ``node_id``, replacing an older one about it."""
        self._order += 1
        self._items[node_id] = _Item(record, record_size(record), self._order)
        if len(self._items) > MAX_QUEUED:
            worst = max(self._items, key=lambda k: (self._items[k].sent, -self._items[k].order))
            del self._items[worst]

    @property
    def version(self) -> int:
        """Raised by every push: a key for "nothing queued has changed since"."""
        return self._order

    def pending(self, node_id: int) -> dict[str, Any] | None:
        item = self._items.get(node_id)
        return item.record if item else None

    def take(self, budget: int, limit: int, skip: int | None = None,
             form: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None
             ) -> list[dict[str, Any]]:
        """Records for one datagram within ``budget`` bytes, least-sent and newest first;
        each taken counts as sent once and leaves the queue after ``limit`` sends.
        ``skip`` leaves out the news that one node is alive (for the datagram's
        receiver, who knows).  ``form`` rewrites each record for this receiver (an older
        node's form); None means the record is stale (about a node no longer known at
        that boot): it is dropped."""
        out: list[dict[str, Any]] = []
        # a datagram holds a few dozen changes at most: no need to sort them all
        ordered = heapq.nsmallest(TAKE_AT_MOST, self._items.items(),
                                  key=lambda kv: (kv[1].sent, -kv[1].order))
        for node_id, item in ordered:
            if budget <= 0:
                break
            if node_id == skip and item.record.get("k") in ("a", "r"):
                continue
            record, size = item.record, item.size
            if form is not None:
                formed = form(record)
                if formed is None:
                    del self._items[node_id]
                    continue
                if formed is not record:
                    record, size = formed, record_size(formed)
            if size > budget:
                continue
            out.append(record)
            budget -= size
            item.sent += 1
            if item.sent >= limit:
                del self._items[node_id]
        return out
