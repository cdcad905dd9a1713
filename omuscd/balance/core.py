"""What the balancer knows and does whichever the topology: the nodes' loads as gossiped,
corrected by the moves made here that their figures do not show yet; the room this node
holds for others; the facts of local jobs for the policy; making one move.

It reaches the rest of the node only through :class:`Services`: the cluster's membership,
the load sampler, the job layer (the :class:`Jobs` protocol declared here), whether this
node can migrate, the event publisher and the UDP sender.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from omuscd.balance.policy import PENDING_FOR, Decision, JobLoad, NodeLoad, Policy
from omuscd.cluster.membership import Membership
from omuscd.cluster.view import ClusterView
from omuscd.config import Config
from omuscd.events import Event
from omuscd.jobs.process import refresh_usage, starting
from omuscd.jobs.record import RUNNING, Job, JobError
from omuscd.load import Sampler

log = logging.getLogger("omuscd.balance")

_FIGURES = re.compile(r"\s*\([^()]*\)")  # "(a 2.04, b 0.31)": loads, always in brackets
_SECONDS = re.compile(r"\b\d+(?:\.\d+)?\s?s\b")  # "12 s", "0.5s"


def _gist(text: str) -> str:
    """``text`` without its changing figures: loads (in brackets) and seconds; node
    names and job ids stay (another node or job is news)."""
    return _SECONDS.sub("#s", _FIGURES.sub("", text))


class Jobs(Protocol):
    """What balancing needs of the job layer (JobControl today)."""

    flags: set[str]  # this node's own flags: blocked, quiet, lstay
    guests: dict[str, Job]

    def all_jobs(self) -> list[Job]: ...

    def counts(self) -> int: ...

    async def act(self, job_id: str, action: str, uid: int, sig: int = ...,
                  forwarded: bool = ..., to: str = ...) -> str: ...

    async def cluster_jobs(self) -> list[Job]: ...

    async def expel(self) -> list[str]: ...

    def set_flag(self, flag: str, on: bool) -> str: ...


@dataclass
class Services:
    """The node as balancing sees it; the daemon builds one, tests a fake."""

    cfg: Config
    members: Membership
    sampler: Sampler
    jobs: Jobs
    can_migrate: Callable[[], bool]  # this node has a working CRIU
    view: ClusterView  # the one rule for which nodes may take a job
    publish: Callable[[list[Event]], None]
    send: Callable[[int, dict[str, Any], tuple[str, int]], None]  # a UDP datagram

    @property
    def node_id(self) -> int:
        return self.members.my_id

    @property
    def name(self) -> str:
        return str(self.members.me["name"])


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
class Core:
    """Loads, held room, pending moves and the act of moving, for every topology."""

    s: Services
    held: list[float] = field(default_factory=list)  # until when room is held for others
    pending: list[_Pending] = field(default_factory=list)  # moves not shown yet
    moving: bool = False
    moved_last: bool = False
    said: str = ""

    @property
    def cfg(self) -> Config:
        return self.s.cfg

    def policy(self) -> Policy:
        c = self.cfg
        return Policy(c.balance_threshold, c.min_job_age, c.min_stay, c.transfer_rate)

    def say(self, text: str, kind: str = "balance", steady: bool = False) -> None:
        """A decision or a refusal, for the log and ``watch``; repeats are not said.
        ``steady``: a state looked at every interval ("a is loaded (a 2.04, b 0.31) but
        no job can move: ..."), not said again while only its figures change: at 60
        nodes the loads in it changed at every look, a log line a second."""
        key = _gist(text) if steady else text
        if key == self.said:
            return
        self.said = key
        self.s.publish([Event(kind, text, {})])

    def release_hold(self) -> None:
        """A job arrived here, or a move here was given up: the room held for it is
        taken by the job itself now, or free again.  (Held on after a move that failed,
        it made this node look a job busier than it was for offer_hold: it volunteered for
        nothing more, and the busy node backed off.)"""
        if self.held:
            self.held.pop(0)

    # ------------------------------------------------------------------ views
    def demand_of(self, node_id: int) -> float:
        """Another node's demand (load times lent CPUs) as last gossiped."""
        node = self.s.members.nodes.get(node_id)
        if node is None:
            return 0.0
        return float(node.entry["load"]) * int(node.entry["cpus"])

    def moves_of(self, node_id: int) -> list[int] | None:
        """Another node's gossiped count of jobs moved in and out, None if it tells none."""
        node = self.s.members.nodes.get(node_id)
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
        extra = self._not_shown(now)
        s = self.s
        me = s.members.me
        out = {s.node_id: NodeLoad(
            s.node_id, s.name, me["cpus"], me["speed"], s.sampler.last.load,
            len([h for h in self.held if h > now]),
            not s.view.why_not(s.node_id, moved=True))}
        limit = s.view.stale_after()
        for node in s.members.live_nodes():
            e = node.entry
            out[node.id] = NodeLoad(node.id, node.name, e["cpus"], e["speed"],
                                    float(e["load"]), extra.get(node.id, 0.0),
                                    not s.view.why_not(node.id, moved=True, now=now),
                                    node.age(now), node.age(now) <= limit)
        return out

    def _not_shown(self, now: float) -> dict[int, float]:
        """Per node, the demand of the moves made here that its figures do not show."""
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
        return extra

    def pending_text(self, now: float) -> str:
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
        jobs = [j for j in self.s.jobs.all_jobs()
                if j.node == self.s.node_id and j.state == RUNNING and not starting(j)]
        refresh_usage(jobs)  # one pass for all (a pass per job cost one scan each)
        return [self.job_load(j, now) for j in jobs]

    # ------------------------------------------------------------------ moving
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
                 if n != self.s.node_id}  # this node's own count needs no correction
        try:
            text = await self.s.jobs.act(decision.job, "migrate", 0, to=str(decision.target))
        except JobError as e:
            self.say(f"balancing: move of job {decision.job} failed: {e}")
        else:
            self._note_pending(decision, source, bases)
            self.moved_last = True
            self.say(f"balancing: {decision.reason}: {text}")
        finally:
            self.moving = False

    def _note_pending(self, decision: Decision, source: int,
                      bases: dict[int, tuple[float, list[int] | None]]) -> None:
        """Until their figures show it (see loads), the target lacks the job and the
        source still has it."""
        assert decision.target is not None
        until = trio.current_time() + PENDING_FOR
        for node, delta in ((decision.target, 1.0), (source, -1.0)):
            if node in bases:
                demand, moves = bases[node]
                new = _Pending(until, node, delta, demand, None)
                if moves is not None:
                    before = [p.expect for p in self.pending if p.node == node and
                              p.side == new.side and p.expect is not None]
                    new.expect = max([moves[new.side], *before]) + 1
                self.pending.append(new)
