"""The sans-IO contract the simulator drives (SWIMAPI.md), and the factory of real nodes."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any
from typing import Protocol as TypingProtocol

from omuscd.events import Event

Address = tuple[str, int]


class Protocol(TypingProtocol):
    """What the simulator needs of a node: omuscd.cluster.swim.Swim's public face."""

    members: Any

    def start(self, now: float, seeds: list[Address]) -> list[Any]: ...

    def handle(self, src: Address, sender_id: int, sender_boot: int, mtype: int,
               body: dict[str, Any], now: float) -> list[Any]: ...

    def tick(self, now: float) -> list[Any]: ...

    def next_due(self) -> float: ...

    def take_events(self) -> list[Event]: ...


#: (node's initial entry, its own random source) -> the protocol object of that node
Factory = Callable[[dict[str, Any], random.Random], Protocol]


def swim_factory(revision_0: Callable[[int], bool] | None = None, **params: Any
                 ) -> Factory:
    """Nodes running the real SWIM core with ``SwimParams(**params)`` (defaults otherwise);
    those whose id ``revision_0`` accepts speak as a daemon of protocol revision 0 (2a0)
    does, as far as its wire goes (see :func:`_revision_0`).  Imported here, not at the
    top, so the harness's own tests run without the core."""
    from omuscd.cluster.membership import Membership
    from omuscd.cluster.swim import Swim, SwimParams

    swim_params = SwimParams(**params)

    def make(entry: dict[str, Any], rng: random.Random) -> Protocol:
        members = Membership(entry, rng=rng)
        swim = Swim(members, swim_params, rng)
        if revision_0 is not None and revision_0(entry["id"]):
            _revision_0(swim)
        return swim

    return make


def _revision_0(swim: Any) -> None:
    """Make ``swim`` a node of protocol revision 0 on the wire: its entry has no ``pr``,
    it sends every refutation as a whole entry, and it drops a datagram carrying a change
    record of a kind it does not know (2a0's messages.check_record)."""
    from omuscd import wire

    swim.members.me.pop("pr", None)
    swim.signature = swim.members.signature()  # not news: it never had one
    swim.reads_compact = lambda node: False
    handle = swim.handle

    def old_handle(src: Address, sender_id: int, sender_boot: int, mtype: int,
                   body: dict[str, Any], now: float) -> list[Any]:
        records = body.get("b")
        if isinstance(records, list) and any(
                isinstance(r, dict) and r.get("k") not in ("a", "s", "d", "l")
                for r in records):
            swim.unread = getattr(swim, "unread", 0) + 1
            raise wire.WireError("malformed", "change record")
        return handle(src, sender_id, sender_boot, mtype, body, now)

    swim.handle = old_handle
