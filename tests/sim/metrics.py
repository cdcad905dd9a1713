"""What the runs measure: how long news takes to reach the nodes, false alarms, bytes."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omuscd.events import Event
from tests.sim.node import SimNode


class Watch:
    """Times how long until ``fraction`` of the live nodes (the subject left out) see
    ``subject`` in a state that ``want`` accepts (None: not in the table).

    It is kept up to date step by step: after each step of a node the simulator asks the
    watch to look at that node's view of the subject (one dict lookup), so a watch costs
    O(1) per step and O(N) once, when it is set.  Once reached it stays reached; ``ok``
    keeps following the views (a view that changes back leaves it).
    """

    def __init__(self, sim: Any, subject: SimNode, want: Callable[[str | None], bool],
                 fraction: float = 1.0, name: str = ""):
        self.sim = sim
        self.subject = subject
        self.want = want
        self.fraction = fraction
        self.name = name or f"node {subject.id}"
        self.since: float = sim.now
        self.ok: set[int] = set()
        self.reached_at: float | None = None
        self.need = self.needed()
        for node in sim.nodes:
            self.check(node, self.since)

    def needed(self) -> int:
        """How many observers must agree: ceil(fraction * live observers), at least 1."""
        observers = sum(1 for n in self.sim.nodes if n.live and n is not self.subject)
        return max(1, math.ceil(round(self.fraction * observers, 6)))

    def check(self, node: SimNode, now: float) -> None:
        if node is self.subject or not node.live:
            return
        if self.want(node.state_of(self.subject.id)):
            self.ok.add(node.index)
            if self.reached_at is None and len(self.ok) >= self.need:
                self.reached_at = now
        else:
            self.ok.discard(node.index)

    def forget(self, node: SimNode) -> None:
        """A crashed node is no observer any more."""
        self.ok.discard(node.index)
        self.need = self.needed()
        if self.reached_at is None and len(self.ok) >= self.need:
            self.reached_at = self.sim.now

    @property
    def took(self) -> float | None:
        return None if self.reached_at is None else self.reached_at - self.since


@dataclass
class Alarm:
    time: float
    observer: int  # node index
    subject: int  # node index
    stalled: bool  # the subject was stalled at the time, or had been within 10 s


@dataclass
class Metrics:
    """False alarms from the nodes' events: a ``dead`` (or ``suspect``) event about a node
    that has not crashed.  A node on the other side of a partition is not counted."""

    sim: Any
    false_deaths: list[Alarm] = field(default_factory=list)
    false_suspicions: list[Alarm] = field(default_factory=list)
    true_deaths: int = 0
    events: dict[str, int] = field(default_factory=dict)
    last_stall: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sim.observers.append(self.on_events)

    def on_events(self, node: SimNode, events: list[Event], now: float) -> None:
        by_id = self.sim.by_id
        net = self.sim.net
        for e in events:
            self.events[e.kind] = self.events.get(e.kind, 0) + 1
            if e.kind not in ("dead", "suspect"):
                continue
            subject = by_id.get(e.data.get("node"))
            if subject is None or subject.crashed or net.across(node.index, subject.index):
                self.true_deaths += e.kind == "dead"
                continue
            stalled = subject.stalled_until > 0 and subject.stalled_until > now - 10.0
            alarm = Alarm(now, node.index, subject.index, stalled)
            (self.false_deaths if e.kind == "dead" else self.false_suspicions).append(alarm)

    def table_false_deaths(self) -> int:
        """Dead entries, right now, for nodes that are live: the events' count checked
        against the tables themselves (O(N^2): at the end of a run only)."""
        sim = self.sim
        count = 0
        for obs in sim.live():
            for nid, entry in obs.proto.members.nodes.items():
                subject = sim.by_id.get(nid)
                if entry.state == "dead" and subject is not None and subject.live:
                    count += 1
        return count


class ByteMeter:
    """Bytes each node sent between ``start()`` and ``stop()``, per second."""

    def __init__(self, sim: Any):
        self.sim = sim
        self.t0 = sim.now
        self.b0 = sim.bytes_sent()

    def rates(self) -> list[float]:
        """Bytes per second of each node live throughout the window."""
        sim = self.sim
        dt = sim.now - self.t0
        return [(n.bytes_sent - self.b0[n.index]) / dt
                for n in sim.nodes[:len(self.b0)] if n.live]
