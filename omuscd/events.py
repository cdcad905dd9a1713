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
