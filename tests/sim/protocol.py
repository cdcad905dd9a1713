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


def swim_factory(**params: Any) -> Factory:
    """Nodes running the real SWIM core with ``SwimParams(**params)`` (defaults otherwise).
    Imported here, not at the top, so the harness's own tests run without the core."""
    from omuscd.cluster.membership import Membership
    from omuscd.cluster.swim import Swim, SwimParams

    swim_params = SwimParams(**params)

    def make(entry: dict[str, Any], rng: random.Random) -> Protocol:
        members = Membership(entry, rng=rng)
        return Swim(members, swim_params, rng)

    return make
