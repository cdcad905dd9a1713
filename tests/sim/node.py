"""One simulated node: the protocol object, its codec, and what the harness does to it."""

from __future__ import annotations

from collections import deque
from typing import Any

from omuscd import wire

#: A stopped process's socket keeps datagrams until its receive buffer is full (Linux's
#: default net.core.rmem_default); each costs its size plus the kernel's overhead.
RCVBUF = 212992
SKB_OVERHEAD = 576


class SimNode:
    """``proto`` is the object under test; the rest is the harness's state of the node."""

    __slots__ = (
        "address",
        "backlog",
        "backlog_bytes",
        "bytes_sent",
        "codec",
        "crashed",
        "datagrams_in",
        "datagrams_sent",
        "drops",
        "entry",
        "id",
        "index",
        "overflow",
        "proto",
        "stalled_until",
        "started",
        "started_at",
        "ticks_at",
        "wake_at",
    )

    def __init__(self, index: int, entry: dict[str, Any], proto: Any, codec: wire.Codec):
        self.index = index
        self.id = int(entry["id"])
        self.address = (str(entry["addr"]), int(entry["port"]))
        self.entry = entry
        self.proto = proto
        self.codec = codec
        self.started = False
        self.crashed = False
        self.stalled_until = 0.0
        self.backlog: deque[tuple[bytes, int]] = deque()
        self.backlog_bytes = 0
        self.overflow = 0
        self.wake_at = float("inf")
        self.bytes_sent = 0
        self.datagrams_sent = 0
        self.datagrams_in = 0
        self.drops = 0
        self.started_at = 0.0
        self.ticks_at = (0.0, 0)  # (time, ticks at that time): a protocol stuck in a loop

    @property
    def live(self) -> bool:
        """Started and not crashed (a stalled node is live: it is only slow)."""
        return self.started and not self.crashed

    def queue(self, data: bytes, src: int) -> None:
        """A datagram arriving while stalled waits in the socket buffer, or is dropped if
        the buffer is full, as the kernel does."""
        cost = len(data) + SKB_OVERHEAD
        if self.backlog_bytes + cost > RCVBUF:
            self.overflow += 1
            return
        self.backlog.append((data, src))
        self.backlog_bytes += cost

    def state_of(self, subject_id: int) -> str | None:
        """This node's view of another (None if it does not know it)."""
        n = self.proto.members.nodes.get(subject_id)
        return None if n is None else n.state

    def __repr__(self) -> str:
        return f"SimNode({self.index}, id={self.id}, {self.address[0]})"
