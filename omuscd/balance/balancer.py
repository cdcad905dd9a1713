"""Automatic load balancing: the loop that runs the topology configured.

Both topologies (:mod:`.peer`, :mod:`.controller`) ask the one policy
(:func:`omuscd.balance.policy.decide`) and move jobs with the one migration machinery,
through :class:`~omuscd.balance.core.Core`; they differ only in who decides.  Owner
reclaim (:mod:`.reclaim`) runs on every look, whatever the topology.

Every decision and every refusal is logged with its reason and shown in ``watch``;
a refusal is said once until the reason changes.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from omuscd.balance.controller import Controller
from omuscd.balance.core import Core, Services
from omuscd.balance.peer import Peer
from omuscd.balance.reclaim import Reclaim

log = logging.getLogger("omuscd.balance")


class Balancer:
    """One node's balancing: ``run`` is its task; ``poke`` makes it look now."""

    def __init__(self, services: Services):
        self.core = Core(services)
        self.peer = Peer(self.core)
        self.controller = Controller(self.core)
        self.reclaim = Reclaim(self.core)
        self._poked = trio.Event()

    @property
    def cfg(self) -> Any:
        return self.core.cfg

    def poke(self) -> None:
        """Look now rather than at the next interval: loads have just changed."""
        self._poked.set()

    def release_hold(self) -> None:
        """A move here arrived or was given up: see Core.release_hold."""
        self.core.release_hold()

    def on_request(self, body: dict[str, Any], source: tuple[str, int], sender: int) -> None:
        self.peer.on_request(body, source, sender)

    def on_offer(self, body: dict[str, Any], source: tuple[str, int], sender: int) -> None:
        self.peer.on_offer(body, source, sender)

    async def run(self, nursery: trio.Nursery) -> None:
        """Look every balance_interval, or when poked; tasks it starts (sending guests
        away on reclaim) run in ``nursery``, the daemon's."""
        while True:
            # after a move, look again at once: a node with many jobs to shed would
            # otherwise send one per interval while the other nodes wait
            if not self.core.moved_last:
                deadline = trio.current_time() + self.cfg.balance_interval
                if self.peer.wake_at is not None:
                    deadline = min(deadline, self.peer.wake_at)
                with trio.move_on_at(deadline):
                    await self._poked.wait()
            self.peer.wake_at = None
            self._poked = trio.Event()
            self.core.moved_last = False
            try:
                await self.tick(nursery)
            except Exception:  # a bug in balancing must not stop the daemon
                log.exception("balancing: internal error")
                await trio.sleep(self.cfg.balance_interval)

    async def tick(self, nursery: trio.Nursery) -> None:
        now = trio.current_time()
        self.reclaim.tick(now, nursery)
        if not self.cfg.balancing or self.core.moving:
            return
        role = self.cfg.topology
        if role == "peer":
            await self.peer.tick(now)
        elif role == "controller":
            await self.controller.tick(now)
        else:
            self.controller.drone_tick()
