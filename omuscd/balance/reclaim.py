"""Owner reclaim (``reclaim_above``): when the load that is not cluster jobs stays above
the limit for ``reclaim_for``, the node blocks and sends its guests away; when it stays
below, the node opens again.
"""

from __future__ import annotations

import logging

import trio

from omuscd.balance.core import Core
from omuscd.jobs.record import RUNNING

log = logging.getLogger("omuscd.balance")


class Reclaim:
    def __init__(self, core: Core):
        self.core = core
        self.owner_high_since: float | None = None
        self.owner_low_since: float | None = None
        self.reclaimed = False
        self.expelling = False
        self.next_expel = 0.0

    def tick(self, now: float, nursery: trio.Nursery) -> None:
        """Look at the owner's load; guests are sent away in a task of ``nursery``."""
        core = self.core
        limit = core.cfg.reclaim_above
        if limit is None:
            return
        s = core.s
        me = s.members.me
        owner = max(0.0, float(me["load"]) - s.jobs.counts() / max(1, me["cpus"]))
        hold = core.cfg.reclaim_for
        if owner > limit:
            self.owner_low_since = None
            self.owner_high_since = self.owner_high_since or now
            if not self.reclaimed and now - self.owner_high_since >= hold:
                self.reclaimed = True
                s.jobs.set_flag("blocked", True)
                core.say(f"reclaim: the owner's load {owner:.2f} is above {limit:g}: "
                         "blocked, sending guests away", kind="reclaim")
            guests = any(j.state == RUNNING and j.node == s.node_id
                         for j in s.jobs.guests.values())
            if self.reclaimed and guests and not self.expelling and now >= self.next_expel:
                self.expelling = True  # again while guests remain (a move may fail)
                self.next_expel = now + hold
                nursery.start_soon(self._expel)
        else:
            self.owner_high_since = None
            self.owner_low_since = self.owner_low_since or now
            if self.reclaimed and now - self.owner_low_since >= hold:
                self.reclaimed = False
                s.jobs.set_flag("blocked", False)
                core.say(f"reclaim: the owner's load {owner:.2f} is below {limit:g}: open "
                         "again", kind="reclaim")

    async def _expel(self) -> None:
        try:
            for line in await self.core.s.jobs.expel():
                log.info("reclaim: %s", line)
        finally:
            self.expelling = False
