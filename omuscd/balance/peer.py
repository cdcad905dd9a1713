"""The peer topology (the default): a node whose pressure exceeds the least loaded node's
by more than the threshold picks a job and sends a REQUEST to the live nodes; those with
room answer with an OFFER and hold that room for ``offer_hold`` seconds, so one idle node
is not flooded by many busy ones at once; the requester takes the best offer.  A request
that finds no volunteer backs off (doubling, up to 30 s), until news of room ends the wait.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import trio

from omuscd import wire
from omuscd.balance.core import Core
from omuscd.balance.policy import Decision, NodeLoad, decide, imbalance, narrows

log = logging.getLogger("omuscd.balance")

OFFER_WAIT = 0.3  # seconds a requester collects offers
MAX_BACKOFF = 30.0


@dataclass
class _Request:
    """A request for room of ours, while its offers come in."""

    asked: int = 0
    offers: list[tuple[float, int]] = field(default_factory=list)  # (pressure after, node)
    all_in: trio.Event = field(default_factory=trio.Event)


class Peer:
    """Requests and offers between equal nodes."""

    def __init__(self, core: Core):
        self.core = core
        self.rid = 0
        self.requests: dict[int, _Request] = {}  # ours, collecting offers, by request id
        self.backoff = 0.0
        self.backoff_until = 0.0
        self.backoff_demand: dict[int, float] = {}  # the others' demand when we backed off
        self.said_balanced = ""
        self.wake_at: float | None = None  # look again then (a job may move by then)

    async def tick(self, now: float) -> None:
        core = self.core
        loads = core.loads(now)
        if now < self.backoff_until:
            if not self.room_since_backoff(loads):
                return
            self.backoff_until = 0.0
            core.say("balancing: a node has room now; asking again")
        me = loads.pop(core.s.node_id)
        target, why = imbalance(me, list(loads.values()), core.policy())
        if target is None:  # nothing to gain: no need to look at the jobs
            if not why.startswith("balanced"):
                core.say(f"balancing: {why}", steady=True)
            elif why != self.said_balanced:  # not news for watch, but for a debug log
                self.said_balanced = why
                log.debug("balancing: %s%s", why, core.pending_text(now))
            return
        decision = decide(me, list(loads.values()), core.local_jobs(), core.policy())
        if decision.job is None:
            if not decision.reason.startswith("balanced"):
                core.say(f"balancing: {decision.reason}", steady=True)
            if decision.retry_in is not None:
                self.wake_at = now + decision.retry_in + 0.01
            return
        offers = await self._ask(me, loads, decision.job)
        if not offers:
            self.backoff = min(MAX_BACKOFF, max(self.backoff * 2, core.cfg.balance_interval))
            self.backoff_until = trio.current_time() + self.backoff
            self.backoff_demand = {n.id: n.demand for n in loads.values()}
            core.say(f"balancing: no node volunteered for job {decision.job}; asking again "
                     f"in {self.backoff:.0f}s")
            return
        self.backoff = 0.0
        _, target = min(offers)
        await core.move(Decision(decision.job, target, decision.reason), core.s.node_id)

    async def _ask(self, me: NodeLoad, loads: dict[int, NodeLoad],
                   job: str) -> list[tuple[float, int]]:
        """Send a REQUEST for ``job`` to every node that may take it; collect the offers
        for OFFER_WAIT, or until every node asked has answered."""
        s = self.core.s
        fastest = max([me.speed, *(n.speed for n in loads.values())])
        self.rid += 1
        rid = self.rid
        request = self.requests[rid] = _Request()
        body = {"rid": rid, "pressure": round(me.pressure(fastest), 3),
                "cpus": me.cpus, "job": job}
        for node in s.members.live_nodes():
            if loads.get(node.id) is not None and loads[node.id].can_take:
                s.send(wire.REQUEST, body, node.address)
                request.asked += 1
        with trio.move_on_after(OFFER_WAIT):  # or sooner, once every node asked answered
            await request.all_in.wait()
        return self.requests.pop(rid).offers

    def room_since_backoff(self, loads: dict[int, NodeLoad]) -> bool:
        """Whether a node has gained room for a job since no node volunteered: the wait
        is for a cluster that has none, and ends at the news.  (Jobs ended on the only
        other node, whose held room had kept it from volunteering; this node kept its
        four jobs for another 4 s of backoff while that node idled.)"""
        return any(n.can_take and n.demand <= self.backoff_demand.get(n.id, n.demand) - 1
                   for i, n in loads.items() if i != self.core.s.node_id)

    def on_request(self, body: dict[str, Any], source: tuple[str, int], sender: int) -> None:
        """A busy node asks for room: offer it if we have it, and hold it a while."""
        core = self.core
        cfg = core.cfg
        if cfg.topology != "peer" or not cfg.balancing:
            return
        try:
            rid, cpus = int(body["rid"]), int(body["cpus"])
            theirs = wire.finite(body["pressure"])
        except (KeyError, TypeError, ValueError):
            raise wire.WireError("malformed", "bad balancing request") from None
        now = trio.current_time()
        core.held = [h for h in core.held if h > now]
        loads = core.loads(now)
        me = loads[core.s.node_id]
        if not me.can_take:
            return
        fastest = max(n.speed for n in loads.values())
        mine, mine_after = me.pressure(fastest), me.pressure(fastest, +1)
        theirs_after = theirs - 1 / max(1, cpus)
        if theirs - mine <= cfg.balance_threshold or \
                not narrows(theirs, mine, theirs_after, mine_after):
            return
        core.held.append(now + cfg.offer_hold)
        core.s.send(wire.OFFER, {"rid": rid, "after": round(mine_after, 3)}, source)
        log.debug("balancing: offered room to node %d (request %d)", sender, rid)

    def on_offer(self, body: dict[str, Any], source: tuple[str, int], sender: int) -> None:
        try:
            rid, after = int(body["rid"]), wire.finite(body["after"])
        except (KeyError, TypeError, ValueError):
            raise wire.WireError("malformed", "bad balancing offer") from None
        request = self.requests.get(rid)
        if request is not None:
            request.offers.append((after, sender))
            if len(request.offers) >= request.asked:
                request.all_in.set()
