"""Fakes, one per interface a layer declares, for tests of that layer alone.

Each section belongs to the layer whose interface it fakes; a fake holds only what the
interface names, so a test that reaches for more fails loudly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from omuscd import config
from omuscd.cluster.membership import ALIVE, Timing

# ---------------------------------------------------------------------- cluster


def fake_cfg(**values: Any) -> SimpleNamespace:
    """The configuration's defaults as attributes, some overridden."""
    return SimpleNamespace(**{**config.defaults(), **values})


@dataclass
class FakeNode:
    """A node of the membership table as the layers above read it."""

    id: int
    name: str
    entry: dict[str, Any]
    state: str = ALIVE
    auth: str = "key"
    address: tuple[str, int] = ("192.0.2.1", 14000)
    heard: float | None = None  # when its figures were produced; None: always fresh

    def age(self, now: float) -> float:
        return 0.0 if self.heard is None else max(0.0, now - self.heard)


@dataclass
class FakeMembers:
    """Membership as read from above: this node's entry and the others."""

    me: dict[str, Any]
    nodes: dict[int, FakeNode] = field(default_factory=dict)
    timing: Timing = field(default_factory=Timing)

    @property
    def my_id(self) -> int:
        return int(self.me["id"])

    def live_nodes(self) -> list[FakeNode]:
        return [n for n in self.nodes.values() if n.state != "dead"]

    def live_count(self) -> int:
        return len(self.live_nodes())


def wire_entry(nid: int = 5, **kw: Any) -> dict[str, Any]:
    """A node's entry as gossiped (the wire form membership merges), fields overridden."""
    e = {"id": nid, "boot": 77, "inc": 1, "hb": 3, "age": 0, "name": f"n{nid}",
         "addr": "198.18.0.5", "port": 4270, "role": "peer", "rel": "1a0", "st": "up",
         "cpus": 2, "speed": 2000, "mem": 100, "load": 0.5, "util": 10.0, "runq": 1,
         "jobs": 0, "flags": []}
    e.update(kw)
    return e


# ---------------------------------------------------------------------- balance


@dataclass
class FakeBalanceJobs:
    """balance.core.Jobs: the job layer as balancing uses it; ``act`` is the test's."""

    act: Any = None
    flags: set[str] = field(default_factory=set)
    guests: dict[str, Any] = field(default_factory=dict)

    def all_jobs(self) -> list[Any]:
        return list(self.guests.values())

    def counts(self) -> int:
        return len(self.guests)


def balance_services(me_load: float, b_load: float, act: Any = None,
                     b_moves: list[int] | None = None, **cfg: Any) -> Any:
    """balance.core.Services for two nodes: this node a (id 1, one CPU, CRIU) and node b
    (id 2), each with the load given; ``sent`` collects the datagrams sent."""
    from omuscd.balance.core import Services
    from omuscd.cluster.view import ClusterView

    me = {"id": 1, "name": "a", "load": me_load, "cpus": 1, "speed": 1000, "flags": ["criu"]}
    b_entry = {"load": b_load, "cpus": 1, "speed": 1000, "flags": ["criu"]}
    if b_moves is not None:
        b_entry["moves"] = b_moves
    members = FakeMembers(me, {2: FakeNode(2, "b", b_entry)})
    sent: list[tuple[int, dict[str, Any], tuple[str, int]]] = []
    view = ClusterView(members, SimpleNamespace(available=True))  # type: ignore[arg-type]
    s = Services(fake_cfg(**cfg), members, SimpleNamespace(last=SimpleNamespace(load=me_load)),
                 FakeBalanceJobs(act), lambda: True, view, lambda events: None,
                 lambda *m: sent.append(m))
    s.sent = sent  # type: ignore[attr-defined]
    return s
