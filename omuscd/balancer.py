"""Automatic load balancing, in the two topologies of the original daemon.

Both ask the one policy (:func:`omuscd.balance.decide`) and move jobs with the one
migration machinery; they differ only in who decides:

- **peer** (the default): a node whose pressure exceeds the least loaded node's by more
  than the threshold picks a job and sends a REQUEST to the live nodes; those with room
  answer with an OFFER and hold that room for ``offer_hold`` seconds, so one idle node is
  not flooded by many busy ones at once; the requester takes the best offer.  A request
  that finds no volunteer backs off (doubling, up to 30 s).
- **controller/drone**: the controller with the lowest id holds the cluster view and
  orders every move; drones never start one.  Without a reachable controller, drones say
  that balancing has stopped (no split brain); it resumes when a controller returns.

Owner reclaim (``reclaim_above``): when the load that is not cluster jobs stays above the
limit, the node blocks and sends its guests away; when it falls, the node opens again.

Every decision and every refusal is logged with its reason and shown in ``watch``;
a refusal is said once until the reason changes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from omuscd import wire
from omuscd.balance import (
    PENDING_FOR,
    Decision,
    JobLoad,
    NodeLoad,
    Policy,
    decide,
    imbalance,
    narrows,
)
from omuscd.cluster.membership import ALIVE
from omuscd.cluster.view import ClusterView
from omuscd.events import Event
from omuscd.jobs.process import refresh_usage, starting
from omuscd.jobs.record import RUNNING, Job, JobError

if TYPE_CHECKING:
    from omuscd.daemon import Daemon

log = logging.getLogger("omuscd.balance")

OFFER_WAIT = 0.3  # seconds a requester collects offers
MAX_BACKOFF = 30.0


@dataclass
class _Pending:
    """A move made here that another node's gossiped figures may not show yet."""

    until: float  # forgotten then at the latest (PENDING_FOR)
    node: int
    delta: float  # +1: the job arrives there; -1: it leaves
    base: float  # the node's demand when the move began
    expect: int | None  # its count of jobs moved in (or out) that shows this move, if it
    # gossips one: one more than its count when the move began, or than the count that
    # shows the move made before this one, whichever is more (its gossip may lag)

    @property
    def side(self) -> int:
        return 0 if self.delta > 0 else 1  # index in a gossiped entry's "moves"


@dataclass
class _Request:
    """A request for room of ours, while its offers come in."""

    asked: int = 0
    offers: list[tuple[float, int]] = field(default_factory=list)  # (pressure after, node)
    all_in: trio.Event = field(default_factory=trio.Event)


class Balancer:
    def __init__(self, daemon: Daemon):
        self.d = daemon
        self.view = ClusterView(daemon.members, daemon.mover)  # who may take a moved job
        self.rid = 0
        self.requests: dict[int, _Request] = {}  # ours, collecting offers, by request id
        self.held: list[float] = []  # until when offered room is held for requesters
        self.pending: list[_Pending] = []  # moves made here, until the nodes' figures show them
        self.backoff = 0.0
        self.backoff_until = 0.0
        self.backoff_demand: dict[int, float] = {}  # the others' demand when we backed off
        self.moving = False
        self.moved_last = False
        self.said = ""
        self.said_balanced = ""
        self.no_controller = False
        self.owner_high_since: float | None = None
        self.owner_low_since: float | None = None
        self.reclaimed = False
        self.expelling = False
        self.next_expel = 0.0
        self._poked = trio.Event()
        self.wake_at: float | None = None  # look again then (a job may move by then)

    # ------------------------------------------------------------------ views
    @property
    def cfg(self) -> Any:
        return self.d.cfg

    def policy(self) -> Policy:
        c = self.cfg
        return Policy(c.balance_threshold, c.min_job_age, c.min_stay, c.transfer_rate)

    def say(self, text: str, kind: str = "balance") -> None:
        """A decision or a refusal, for the log and ``watch``; repeats are not said."""
        if text == self.said:
            return
        self.said = text
        self.d.publish([Event(kind, text, {})])

    def demand_of(self, node_id: int) -> float:
        """Another node's demand (load times lent CPUs) as last gossiped."""
        node = self.d.members.nodes.get(node_id)
        if node is None:
            return 0.0
        return float(node.entry["load"]) * int(node.entry["cpus"])

    def moves_of(self, node_id: int) -> list[int] | None:
        """Another node's gossiped count of jobs moved in and out, None if it tells none."""
        node = self.d.members.nodes.get(node_id)
        moves = node.entry.get("moves") if node is not None else None
        return list(moves) if isinstance(moves, list) and len(moves) == 2 else None

    def loads(self, now: float) -> dict[int, NodeLoad]:
        """Every node's load, with the moves made here that its figures do not show yet.

        A node counts the jobs moved in and out of it and gossips the counts with its
        load, counted the moment a job lands or leaves: a move it has counted is in its
        figure.  (Judged by how far its figure had moved instead, a move was counted on
        after the job, or another one, had ended there: a node whose only job ended was
        taken for busy and stayed idle for up to PENDING_FOR; that is still the way for
        a node that gossips no counts.)

        This node's own figure is the count taken the moment its jobs last came or went
        (Sampler.at_once), never corrected: it already shows every move, and a correction
        measured against a figure taken while jobs were still starting took moves off
        twice (a node that had started 8 jobs and sent 3 away thought it had 2, not 5,
        and held the fourth move back for 3 s)."""
        def shown(p: _Pending) -> bool:
            moves = self.moves_of(p.node)
            return p.expect is not None and moves is not None and moves[p.side] >= p.expect

        self.pending = [p for p in self.pending if p.until > now and not shown(p)]
        counted: dict[int, float] = {}  # nodes that tell their moves: what is not shown
        moved: dict[int, tuple[float, float]] = {}  # the others: (sum of deltas, base)
        for p in self.pending:
            if p.expect is not None and self.moves_of(p.node) is not None:
                counted[p.node] = counted.get(p.node, 0.0) + p.delta
            else:
                total, first = moved.get(p.node, (0.0, p.base))
                moved[p.node] = (total + p.delta, first)
        extra = dict(counted)
        for node, (total, base) in moved.items():
            seen = self.demand_of(node) - base  # what its figure shows of them already
            if total > 0:
                extra[node] = max(0.0, total - max(0.0, seen))
            else:
                extra[node] = min(0.0, total - min(0.0, seen))
        me = self.d.members.me
        out = {self.d.node_id: NodeLoad(
            self.d.node_id, self.d.name, me["cpus"], me["speed"], self.d.sampler.last.load,
            len([h for h in self.held if h > now]),
            not self.view.why_not(self.d.node_id, moved=True))}
        for node in self.d.members.live_nodes():
            e = node.entry
            out[node.id] = NodeLoad(node.id, node.name, e["cpus"], e["speed"],
                                    float(e["load"]), extra.get(node.id, 0.0),
                                    not self.view.why_not(node.id, moved=True))
        return out

    def _pending_text(self, now: float) -> str:
        if not self.pending:
            return ""
        return " (moves not shown yet: " + ", ".join(
            f"node {p.node} {p.delta:+g} from {p.base:g}, {p.until - now:.1f}s more"
            for p in self.pending) + ")"

    def job_load(self, job: Job, now_wall: float) -> JobLoad:
        """A job's facts for the policy; its memory as last measured (local_jobs and
        cluster_jobs measure the jobs here in one pass over the process table)."""
        landed = [m["time"] for m in job.moves if "failed" not in m]
        if job.landed_at:
            landed.append(job.landed_at)
        since_move = now_wall - max(landed) if landed else float("inf")  # never moved
        return JobLoad(job.id, job.home, job.rss_mb, now_wall - job.started, since_move,
                       job.stay, job.cannot_move)

    def local_jobs(self) -> list[JobLoad]:
        now = time.time()
        jobs = [j for j in self.d.jobs.all_jobs()
                if j.node == self.d.node_id and j.state == RUNNING and not starting(j)]
        refresh_usage(jobs)  # one pass for all (a pass per job cost one scan each)
        return [self.job_load(j, now) for j in jobs]

    # ------------------------------------------------------------------ the loop
    def poke(self) -> None:
        """Look now rather than at the next interval: loads have just changed."""
        self._poked.set()

    async def run(self) -> None:
        while True:
            # after a move, look again at once: a node with many jobs to shed would
            # otherwise send one per interval while the other nodes wait
            if not self.moved_last:
                deadline = trio.current_time() + self.cfg.balance_interval
                if self.wake_at is not None:
                    deadline = min(deadline, self.wake_at)
                with trio.move_on_at(deadline):
                    await self._poked.wait()
            self.wake_at = None
            self._poked = trio.Event()
            self.moved_last = False
            try:
                await self.tick()
            except Exception:  # a bug in balancing must not stop the daemon
                log.exception("balancing: internal error")
                await trio.sleep(self.cfg.balance_interval)

    def release_hold(self) -> None:
        """A job arrived here, or a move here was given up: the room held for it is
        taken by the job itself now, or free again.  (Held on after a move that failed,
        it made this node look a job busier than it was for offer_hold: it volunteered for
        nothing more, and the busy node backed off.)"""
        if self.held:
            self.held.pop(0)

    async def tick(self) -> None:
        now = trio.current_time()
        self.reclaim(now)
        if not self.cfg.balancing or self.moving:
            return
        role = self.cfg.topology
        if role == "peer":
            await self.peer_tick(now)
        elif role == "controller":
            await self.controller_tick(now)
        else:
            self.drone_tick()

    async def move(self, decision: Decision, source: int) -> None:
        assert decision.job is not None and decision.target is not None
        self.moving = True
        self.said = ""
        log.info("balancing: moving %s", decision.reason)
        # the figures the move is measured against, taken before it: a node tells its
        # load at once when a job leaves or lands (Sampler.at_once), often before the
        # move is over here, and a base taken after that counted the move twice (a node
        # that had sent 2 of its 7 jobs away thought it had 3)
        bases = {n: (self.demand_of(n), self.moves_of(n)) for n in (decision.target, source)
                 if n != self.d.node_id}  # this node's own count needs no correction
        try:
            text = await self.d.jobs.act(decision.job, "migrate", 0, to=str(decision.target))
        except JobError as e:
            self.say(f"balancing: move of job {decision.job} failed: {e}")
        else:
            # until their figures show it (see loads), the target lacks the job and
            # the source still has it
            now = trio.current_time()
            until = now + PENDING_FOR
            for node, delta in ((decision.target, 1.0), (source, -1.0)):
                if node in bases:
                    demand, moves = bases[node]
                    new = _Pending(until, node, delta, demand, None)
                    if moves is not None:
                        before = [p.expect for p in self.pending if p.node == node and
                                  p.side == new.side and p.expect is not None]
                        new.expect = max([moves[new.side], *before]) + 1
                    self.pending.append(new)
            self.moved_last = True
            self.say(f"balancing: {decision.reason}: {text}")
        finally:
            self.moving = False

    # ------------------------------------------------------------------ peer to peer
    async def peer_tick(self, now: float) -> None:
        loads = self.loads(now)
        if now < self.backoff_until:
            if not self.room_since_backoff(loads):
                return
            self.backoff_until = 0.0
            self.say("balancing: a node has room now; asking again")
        me = loads.pop(self.d.node_id)
        target, why = imbalance(me, list(loads.values()), self.policy())
        if target is None:  # nothing to gain: no need to look at the jobs
            if not why.startswith("balanced"):
                self.say(f"balancing: {why}")
            elif why != self.said_balanced:  # not news for watch, but for a debug log
                self.said_balanced = why
                log.debug("balancing: %s%s", why, self._pending_text(now))
            return
        decision = decide(me, list(loads.values()), self.local_jobs(), self.policy())
        if decision.job is None:
            if not decision.reason.startswith("balanced"):
                self.say(f"balancing: {decision.reason}")
            if decision.retry_in is not None:
                self.wake_at = now + decision.retry_in + 0.01
            return
        fastest = max([me.speed, *(n.speed for n in loads.values())])
        self.rid += 1
        rid = self.rid
        request = self.requests[rid] = _Request()
        body = {"rid": rid, "pressure": round(me.pressure(fastest), 3),
                "cpus": me.cpus, "job": decision.job}
        for node in self.d.members.live_nodes():
            if loads.get(node.id) is not None and loads[node.id].can_take:
                self.d.send_message(wire.REQUEST, body, node.address)
                request.asked += 1
        with trio.move_on_after(OFFER_WAIT):  # or sooner, once every node asked answered
            await request.all_in.wait()
        offers = self.requests.pop(rid).offers
        if not offers:
            self.backoff = min(MAX_BACKOFF, max(self.backoff * 2, self.cfg.balance_interval))
            self.backoff_until = trio.current_time() + self.backoff
            self.backoff_demand = {n.id: n.demand for n in loads.values()}
            self.say(f"balancing: no node volunteered for job {decision.job}; asking again "
                     f"in {self.backoff:.0f}s")
            return
        self.backoff = 0.0
        _, target = min(offers)
        await self.move(Decision(decision.job, target, decision.reason), self.d.node_id)

    def room_since_backoff(self, loads: dict[int, NodeLoad]) -> bool:
        """Whether a node has gained room for a job since no node volunteered: the wait
        is for a cluster that has none, and ends at the news.  (Jobs ended on the only
        other node, whose held room had kept it from volunteering; this node kept its
        four jobs for another 4 s of backoff while that node idled.)"""
        return any(n.can_take and n.demand <= self.backoff_demand.get(n.id, n.demand) - 1
                   for i, n in loads.items() if i != self.d.node_id)

    def on_request(self, body: dict[str, Any], source: tuple[str, int], sender: int) -> None:
        """A busy node asks for room: offer it if we have it, and hold it a while."""
        if self.cfg.topology != "peer" or not self.cfg.balancing:
            return
        try:
            rid, cpus = int(body["rid"]), int(body["cpus"])
            theirs = wire.finite(body["pressure"])
        except (KeyError, TypeError, ValueError):
            raise wire.WireError("malformed", "bad balancing request") from None
        now = trio.current_time()
        self.held = [h for h in self.held if h > now]
        loads = self.loads(now)
        me = loads[self.d.node_id]
        if not me.can_take:
            return
        fastest = max(n.speed for n in loads.values())
        mine, mine_after = me.pressure(fastest), me.pressure(fastest, +1)
        theirs_after = theirs - 1 / max(1, cpus)
        if theirs - mine <= self.cfg.balance_threshold or \
                not narrows(theirs, mine, theirs_after, mine_after):
            return
        self.held.append(now + self.cfg.offer_hold)
        self.d.send_message(wire.OFFER, {"rid": rid, "after": round(mine_after, 3)}, source)
        log.debug("balancing: offered room to node %d (request %d)", sender, rid)

    def on_offer(self, body: dict[str, Any], sender: int) -> None:
        try:
            rid, after = int(body["rid"]), wire.finite(body["after"])
        except (KeyError, TypeError, ValueError):
            raise wire.WireError("malformed", "bad balancing offer") from None
        request = self.requests.get(rid)
        if request is not None:
            request.offers.append((after, sender))
            if len(request.offers) >= request.asked:
                request.all_in.set()

    # ------------------------------------------------------------------ controller/drone
    def controllers(self) -> list[int]:
        ids = [n.id for n in self.d.members.live_nodes()
               if n.state == ALIVE and n.entry["role"] == "controller"]
        if self.cfg.topology == "controller":
            ids.append(self.d.node_id)
        return sorted(ids)

    async def controller_tick(self, now: float) -> None:
        ctrl = self.controllers()
        if ctrl[0] != self.d.node_id:
            self.say(f"balancing: two controllers ({', '.join(map(str, ctrl))}); only node "
                     f"{ctrl[0]} acts", kind="warning")
            return
        loads = self.loads(now)
        policy = self.policy()
        fastest = max(n.speed for n in loads.values())
        busiest = sorted(loads.values(), key=lambda n: -n.pressure(fastest))
        verdicts = [imbalance(src, [n for n in loads.values() if n.id != src.id], policy)
                    for src in busiest]
        if not any(target for target, _ in verdicts):
            # the gossiped loads show no move could help: do not ask the nodes for jobs
            if not verdicts[0][1].startswith("balanced"):
                self.say(f"balancing: {verdicts[0][1]}")
            return
        wall = time.time()
        by_node: dict[int, list[JobLoad]] = {}
        for job in await self.d.jobs.cluster_jobs():
            if job.state == RUNNING and job.node in loads:
                by_node.setdefault(job.node, []).append(self.job_load(job, wall))
        first: Decision | None = None
        for src in busiest:
            others = [n for n in loads.values() if n.id != src.id]
            decision = decide(src, others, by_node.get(src.id, []), policy)
            first = first or decision
            if decision.job is not None:
                await self.move(decision, src.id)
                return
        if first is not None and not first.reason.startswith("balanced"):
            self.say(f"balancing: {first.reason}")

    def drone_tick(self) -> None:
        ctrl = self.controllers()
        if not ctrl:
            if not self.no_controller:
                self.no_controller = True
                self.say("balancing stopped: no controller is reachable (drones never "
                         "start a move)", kind="warning")
        elif self.no_controller:
            self.no_controller = False
            self.say(f"balancing resumed: node {ctrl[0]} controls")

    # ------------------------------------------------------------------ owner reclaim
    def reclaim(self, now: float) -> None:
        limit = self.cfg.reclaim_above
        if limit is None:
            return
        me = self.d.members.me
        jobs_here = self.d.jobs.counts()
        owner = max(0.0, float(me["load"]) - jobs_here / max(1, me["cpus"]))
        hold = self.cfg.reclaim_for
        if owner > limit:
            self.owner_low_since = None
            self.owner_high_since = self.owner_high_since or now
            if not self.reclaimed and now - self.owner_high_since >= hold:
                self.reclaimed = True
                self.d.jobs.set_flag("blocked", True)
                self.say(f"reclaim: the owner's load {owner:.2f} is above {limit:g}: "
                         "blocked, sending guests away", kind="reclaim")
            guests = any(j.state == RUNNING and j.node == self.d.node_id
                         for j in self.d.jobs.guests.values())
            if self.reclaimed and guests and not self.expelling and now >= self.next_expel:
                self.expelling = True  # again while guests remain (a move may fail)
                self.next_expel = now + hold
                self.d.jobs._nursery().start_soon(self._expel)
        else:
            self.owner_high_since = None
            self.owner_low_since = self.owner_low_since or now
            if self.reclaimed and now - self.owner_low_since >= hold:
                self.reclaimed = False
                self.d.jobs.set_flag("blocked", False)
                self.say(f"reclaim: the owner's load {owner:.2f} is below {limit:g}: open "
                         "again", kind="reclaim")

    async def _expel(self) -> None:
        try:
            for line in await self.d.jobs.expel():
                log.info("reclaim: %s", line)
        finally:
            self.expelling = False
