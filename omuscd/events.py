"""Cluster events and their subscribers (``watch``, later the console).

The core never waits for a subscriber: each has a bounded channel, and one that falls
behind is dropped with a notice instead of slowing the daemon down.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import trio

log = logging.getLogger("omuscd.events")

SUBSCRIBER_BUFFER = 256
HISTORY = 200  # recent events kept for 'watch --recent N' (a console's first screen)


@dataclass
class Event:
    """One thing that happened: ``kind`` is a short word (join, leave, dead, ...)."""

    kind: str
    text: str
    data: dict[str, Any] = field(default_factory=dict)
    when: float = field(default_factory=time.time)

    def line(self) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(self.when))
        return f"{stamp} {self.kind} {self.text}"

    def to_json(self) -> dict[str, Any]:
        return {"event": self.kind, "time": round(self.when, 3), "text": self.text, **self.data}


class EventBus:
    """Fan-out of events to subscribers; ``publish`` never blocks."""

    def __init__(self) -> None:
        self._subs: list[trio.MemorySendChannel[Event]] = []
        self.dropped_subscribers = 0
        self.history: deque[Event] = deque(maxlen=HISTORY)

    def subscribe(self, buffer: int = SUBSCRIBER_BUFFER,
                  recent: int = 0) -> trio.MemoryReceiveChannel[Event]:
        """A channel of events from now on, after the last ``recent`` ones."""
        send, recv = trio.open_memory_channel[Event](buffer + HISTORY)
        for ev in list(self.history)[-recent:] if recent > 0 else []:
            send.send_nowait(ev)
        self._subs.append(send)
        return recv

    def publish(self, event: Event) -> None:
        self.history.append(event)
        for send in list(self._subs):
            try:
                send.send_nowait(event)
            except trio.WouldBlock:
                self._subs.remove(send)
                self.dropped_subscribers += 1
                log.warning("a watcher fell %d events behind and was dropped", SUBSCRIBER_BUFFER)
                send.close()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subs.remove(send)

    @property
    def subscribers(self) -> int:
        self._subs = [s for s in self._subs if s.statistics().open_receive_channels]
        return len(self._subs)


#: The phases of a move, in order, as :class:`Progress` reports them (``omuscd(8)``,
#: "migrate"): the checks before the freeze, the dump (a streamed dump sends the memory
#: as it goes), the images and output on their way, the restore on the target, a
#: post-copy move's memory following the running job, the end.
CHECKING, DUMPING, SENDING, RESTORING, FOLLOWING, DONE = (
    "checking", "frozen, dumping", "sending", "restoring", "memory following", "done")
PHASES = (CHECKING, DUMPING, SENDING, RESTORING, FOLLOWING, DONE)
_MAX_AMOUNT = 1 << 50  # bytes: more than any job's memory; bounds what a peer may claim


class Progress:
    """How far one long action (a move) has got.

    The moves update it as they go and know nothing of who asked (a control session, a
    node relaying to another); whoever reports it reads it at its own pace.  Only the
    latest state is kept, so a slow reader misses steps but never holds the move up,
    and an update costs no I/O (it is made from inside the frozen window)."""

    def __init__(self) -> None:
        self.job = ""
        self.phase = ""
        self.done = 0  # bytes so far, in the phases that count them
        self.total = 0  # bytes expected, when known (0: not known)
        self.version = 0  # updates so far
        self._changed = trio.Event()

    def update(self, job: str, phase: str, done: int = 0, total: int = 0) -> None:
        self.job, self.phase = job, phase
        self.done, self.total = max(0, done), max(0, total, done) if total else 0
        self.version += 1
        self._changed.set()
        self._changed = trio.Event()

    async def changed_since(self, seen: int) -> int:
        """Wait until there is an update after version ``seen``; the version now."""
        while self.version == seen:
            await self._changed.wait()
        return self.version

    def line(self) -> str:
        """``job 1.2: sending 120 of 1024 MB``: one line, for people."""
        mb = 1e6
        amount = (f" {self.done / mb:.0f} of {self.total / mb:.0f} MB" if self.total else
                  f" {self.done / mb:.0f} MB" if self.done else "")
        tail = " (post-copy)" if self.phase == FOLLOWING else ""
        return f"job {self.job}: {self.phase}{amount}{tail}"

    def to_wire(self) -> dict[str, Any]:
        """The ``progress`` message that carries it to the node that asked."""
        return {"op": "progress", "job": self.job, "phase": self.phase, "done": self.done,
                "total": self.total}

    def take(self, msg: dict[str, Any]) -> bool:
        """Update from another node's ``progress`` message; False (and unchanged) for
        one that is not well formed: a phase of :data:`PHASES`, a job id of up to 64
        characters, amounts that are plausible numbers of bytes."""
        job, phase = msg.get("job"), msg.get("phase")
        done, total = msg.get("done", 0), msg.get("total", 0)
        if phase not in PHASES or not isinstance(job, str) or not 0 < len(job) <= 64:
            return False
        if not job.isprintable() or " " in job:
            return False
        if not all(type(n) is int and 0 <= n <= _MAX_AMOUNT for n in (done, total)):
            return False
        self.update(job, phase, done, total)
        return True
