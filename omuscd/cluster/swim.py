"""SWIM failure detection with Lifeguard's refinements: who is alive, at a cost per node
that does not grow with the cluster.

Each protocol period a node pings one member, taken round-robin from a shuffled list; no
ack within the probe timeout -> it asks ``indirect_checks`` others to ping the member for
it (they relay the ack, or say "nack": no answer from it either); still no ack by the end of
the period -> the member is *suspect*.  A suspicion spreads; the member refutes it by raising
its incarnation number and saying it is alive (a compact record: id, boot, incarnation);
if nobody hears a refutation before the suspicion times out, it is *dead*.  Lifeguard: our
own timeouts and period stretch while we miss acks and nacks (we are probably the slow one,
cluster/suspicion.py's Awareness), and a suspicion's timeout starts long and shrinks as
independent members confirm it.

Changes spread piggybacked on the probes and acks, and every ``gossip_interval`` to a few
members while there are any (cluster/broadcasts.py), each a limited number of times. Every
datagram but gossip carries the sender's own entry (its load and free memory); probes also
carry a few other entries with their ages. Now and then a node exchanges one page of its
table with a random member (push-pull, cluster/antientropy.py): bounded in size, so a node's
traffic stays the same at 16 or 5000 nodes. A node broadcasts only to find the cluster at
start; an isolated one, or one whose peers are unknown, retries slowly, with jitter.

Sans-IO: no sockets, no clock, no global randomness.  Drivers (cluster/gossip.py in the
daemon, the simulator in the tests) call :meth:`Swim.handle` with each decoded datagram,
:meth:`Swim.tick` when :meth:`Swim.next_due` comes, and send the :class:`Outgoing` returned.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from omuscd import wire
from omuscd.cluster import messages
from omuscd.cluster.antientropy import AntiEntropy
from omuscd.cluster.broadcasts import TransmitQueue, retransmit_limit
from omuscd.cluster.membership import ALIVE, DEAD, SUSPECT, Membership, Node, settings_of
from omuscd.cluster.messages import Address, Outgoing
from omuscd.cluster.receive import Receiver, Relay
from omuscd.cluster.suspicion import (
    Awareness,
    Suspicion,
    confirmations_wanted,
    suspicion_bounds,
)
from omuscd.events import Event
from omuscd.version import PROTOCOL_REVISION

#: Bytes a body may take: a datagram less its header and tag.
BODY_BUDGET = wire.MAX_DATAGRAM - wire.HEADER.size - wire.TAG_LEN
LIVENESS_NEWS = ("join", "restart", "alive")


@dataclass
class SwimParams:
    """The protocol's tunables (config.py's table has each, with its reason)."""

    probe_interval: float = 0.5
    probe_timeout: float = 0.25
    indirect_checks: int = 3
    suspicion_mult: float = 4.0
    suspicion_max_mult: float = 6.0
    dead_timeout: float = 10.0  # a suspicion lasts at most this long
    retransmit_mult: int = 4
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    push_pull_interval: float = 10.0
    rejoin_interval: float = 20.0
    awareness_max: int = 8
    figures_per_message: int = 1
    sync_repliers: int = 4
    body_budget: int = BODY_BUDGET

    @classmethod
    def from_config(cls, cfg: Any) -> SwimParams:
        """The tunables of a daemon's configuration (values absent keep the default)."""
        names = cls.__dataclass_fields__
        return cls(**{k: getattr(cfg, k) for k in names
                      if k != "body_budget" and getattr(cfg, k, None) is not None})


@dataclass
class Probe:
    """The probe of the current protocol period."""

    target: int
    seq: int
    start: float
    timeout_at: float
    end_at: float
    indirect: bool = False
    helpers: int = 0
    nacks: int = 0
    acked: bool = False


__all__ = ["Address", "Outgoing", "Swim", "SwimParams"]


@dataclass
class Swim(Receiver):
    """One node's failure detector and disseminator; see the module's docstring.
    (The handlers of each message type are :class:`Receiver`'s.)"""

    members: Membership
    params: SwimParams
    rng: random.Random
    auth: str = "key"  # how datagrams reaching handle() were authenticated
    broadcast: Address | None = None  # the discovery address (not used while quiet)
    queue: TransmitQueue = field(default_factory=TransmitQueue)
    suspicions: dict[int, Suspicion] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    seeds: list[Address] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.members.me.setdefault("n", 0)
        self.members.me["pr"] = PROTOCOL_REVISION  # what we read (version.py)
        self.awareness = Awareness(self.params.awareness_max)
        self.probe: Probe | None = None
        self.relays: dict[int, Relay] = {}
        self.seq = 0
        self.order: list[int] = []
        self.in_order: set[int] = set()  # self.order's ids (a 5000-node table is a long list)
        self.pos = 0
        self.next_probe = self.next_sweep = float("inf")
        self.next_gossip = float("-inf")  # changes go out as soon as there are any
        #: (table generation, queue version) when no queued change could go to anyone
        self.gossip_parked: tuple[int, int] | None = None
        self.expected = float("inf")  # when we expected to be called next (stalls)
        self.signature = self.members.signature()
        self.sync = AntiEntropy(self)

    # ------------------------------------------------------------------ the contract
    def start(self, now: float, seeds: list[Address]) -> list[Outgoing]:
        """Join: HELLO to the seeds (peers, the broadcast address unless quiet)."""
        self.seeds = [s for s in seeds if s != self.broadcast]
        self.next_probe = now + self.rng.uniform(0, self.params.probe_interval)
        self.next_gossip = now
        self.next_sweep = now
        return self.sync.start(now)

    def set_figures(self, **fields: Any) -> None:
        """This node's current figures (load, util, runq, mem, jobs, moves...)."""
        self.members.beat(**fields)

    def take_events(self) -> list[Event]:
        out, self.events = self.events, []
        return out

    def next_due(self) -> float:
        p = self.probe
        due = [self.next_probe, self.next_sweep, self.sync.next_due()]
        if p is not None:
            due.append(p.end_at if p.acked or p.indirect else p.timeout_at)
        if self._gossip_wanted():
            due.append(self.next_gossip)
        due += [r.nack_at for r in self.relays.values()]
        due += [s.deadline for s in self.suspicions.values()]
        return min(due)

    def tick(self, now: float) -> list[Outgoing]:
        out: list[Outgoing] = []
        self._resumed(now)
        self._own_news()
        self._suspicions_due(now)
        self._probe_due(now, out)
        self._relays_due(now, out)
        if self._gossip_wanted() and now >= self.next_gossip:
            self._gossip(now, out)
        out += self.sync.due(now)
        if now >= self.next_sweep:
            events, self.next_sweep = self.members.sweep(now)
            self.events += events
        self.expected = max(now, self.next_due())
        return out + self.answers()

    def _resumed(self, now: float) -> None:
        """Were we stopped (SIGSTOP, a CPU hog, swapping) past a deadline?  Time we did
        not run is no evidence against others: suspicions wait that much longer (the
        refutations may sit unread in our socket), the probe under way gives no verdict,
        and we count ourselves as the slow one (Lifeguard)."""
        late = now - self.expected
        if late <= self.params.probe_interval:
            return
        for s in self.suspicions.values():
            s.start += late
        if self.probe is not None:
            self.probe = None
            self.next_probe = min(self.next_probe, now)
        self.awareness.apply(1)
        self.expected = now

    def handle(self, src: Address, sender_id: int, sender_boot: int, mtype: int,
               body: dict[str, Any], now: float) -> list[Outgoing]:
        """One decoded, authenticated datagram.  Raises wire.WireError for a malformed
        body, having changed nothing."""
        c = messages.check_common(body)
        me = c["me"]
        if me is not None and (me["id"] != sender_id or me["boot"] != sender_boot):
            raise wire.WireError("malformed", "entry does not match the header")
        handler = self._handlers().get(mtype)
        if handler is None:
            raise wire.WireError("malformed", f"message type {mtype} is not SWIM's")
        fields = handler[0](body)  # checked before anything is applied
        if mtype in (wire.HELLO, wire.LEAVE) and \
                (fields[0]["id"], fields[0]["boot"]) != (sender_id, sender_boot):
            raise wire.WireError("malformed", "entry does not match the header")
        if me is not None:
            self.learn(me, now, src)
        for record in c["b"]:
            self.apply_record(record, now)
        for entry in c["e"]:
            if entry["id"] != self.members.my_id:
                self.learn(entry, now, None)
        self.sync.merge_page(c["page"], sender_id, now)
        if c["you"] is not None:
            self._accused(c["you"][1], dead=c["you"][0] == DEAD)
        out: list[Outgoing] = []
        handler[1](src, sender_id, fields, now, out)
        self._settle()
        # when to expect the next tick now: at once if something became due (not at a
        # deadline long past, such as the last gossip's, when a change comes to an empty
        # queue: a node of a quiet cluster counted itself slow at every change), later if
        # an ack ended the wait for the probe timeout (left there, the tick at the
        # period's end looked late to a node whose awareness had stretched its periods);
        # but not later while a stall is yet to be told by tick
        if now - self.expected <= self.params.probe_interval:
            self.expected = max(now, self.next_due())
        return out + self.answers()

    # ------------------------------------------------------------------ sending
    def message(self, dest: Address, mtype: int, body: dict[str, Any], now: float,
                node: Node | None = None, entries: bool = False, own: bool = True
                ) -> Outgoing:
        """A datagram with our entry (unless not ``own``), ``you`` if ``node`` is suspect
        or dead to us, the changes that fit and, with ``entries``, a few other entries."""
        body = {**body, "me": self.members.own_entry()} if own else dict(body)
        if node is not None and node.state in (SUSPECT, DEAD):
            body["you"] = {"s": node.state, "n": node.incarnation}
        budget = self.params.body_budget - messages.json_size(body) - 16
        changes = self.queue.take(budget - 8, self.limit(), node.id if node else None,
                                  None if self.reads_compact(node) else
                                  lambda r: self._whole(r, now))
        if changes:
            body["b"] = changes
            budget -= messages.json_size(changes) + 6
        if entries and self.params.figures_per_message > 0:
            others = self._fresh_entries(now, node, budget - 6)
            if others:
                body["e"] = others
        return Outgoing(dest, mtype, body)

    @staticmethod
    def reads_compact(node: Node | None) -> bool:
        """Does ``node`` read compact refutations (protocol revision 1, version.py)?"""
        return node is not None and node.entry.get("pr", 0) >= 1

    def _whole(self, record: dict[str, Any], now: float) -> dict[str, Any] | None:
        """A change as a node of protocol revision 0 reads it: a compact refutation as
        the refuter's whole entry (None if we no longer hold it at that boot)."""
        if record["k"] != "r":
            return record
        if record["id"] == self.members.my_id:
            return {"k": "a", "e": self.members.own_entry()}
        node = self.members.nodes.get(record["id"])
        if node is None or node.boot != record["boot"]:
            return None
        return {"k": "a", "e": self.members.aged(node, now)}

    def limit(self) -> int:
        return retransmit_limit(self.params.retransmit_mult, self.size())

    def size(self) -> int:
        """The cluster's size as this node estimates it (the live nodes and itself)."""
        return self.members.live_count() + 1

    def answers(self) -> list[Outgoing]:
        """HELLOs membership wants sent (an id's later claimant, an incompatible node)."""
        out = []
        while self.members.to_answer:
            dest = self.members.to_answer.pop()
            out.append(Outgoing(dest, wire.HELLO,
                                {"entry": self.members.own_entry(), "reply": False}))
        return out

    def leave(self, now: float) -> list[Outgoing]:
        """Our departure, to every live node, the seeds and the broadcast address, so
        that they drop us at once instead of suspecting us."""
        self.members.beat()
        bye = {**self.members.own_entry(), "st": "left"}
        dests = {n.address for n in self.members.live_nodes()} | set(self.seeds)
        if self.broadcast is not None:
            dests.add(self.broadcast)
        return [Outgoing(d, wire.LEAVE, {"entry": bye}) for d in sorted(dests)]

    def _fresh_entries(self, now: float, node: Node | None, budget: int) -> list[dict]:
        live = self.members.live_nodes()
        k = self.params.figures_per_message
        pool = self.rng.sample(live, min(len(live), 4 * k))
        pool.sort(key=lambda n: n.heard, reverse=True)
        out: list[dict[str, Any]] = []
        for n in pool:
            if len(out) >= k or (node is not None and n.id == node.id):
                continue
            e = self.members.aged(n, now)
            size = messages.json_size(e) + 1
            if size <= budget:
                out.append(e)
                budget -= size
        return out

    # ------------------------------------------------------------------ the probe cycle
    def _next_target(self) -> Node | None:
        for _ in range(len(self.order) + 2):
            if self.pos >= len(self.order):
                self.order = [n.id for n in self.members.live_nodes()]
                self.rng.shuffle(self.order)
                self.in_order = set(self.order)
                self.pos = 0
                if not self.order:
                    return None
            node = self.members.nodes.get(self.order[self.pos])
            self.pos += 1
            if node is not None and node.state in (ALIVE, SUSPECT):
                return node
        return None

    def add_to_order(self, nid: int) -> None:
        """A new member is probed in this round too, at a random place (memberlist)."""
        if nid not in self.in_order:
            self.order.insert(self.rng.randint(self.pos, len(self.order)), nid)
            self.in_order.add(nid)

    def _probe_due(self, now: float, out: list[Outgoing]) -> None:
        p = self.probe
        if p is not None and not p.acked and not p.indirect and now >= p.timeout_at:
            self._indirect(p, now, out)
        if p is not None and now >= p.end_at:
            self.probe = None
            if not p.acked and self.awareness.missed(p.helpers, p.nacks):
                self._suspect_locally(p.target, now)
        if self.probe is None and now >= self.next_probe:
            self._start_probe(now, out)

    def _start_probe(self, now: float, out: list[Outgoing]) -> None:
        scale = self.awareness.scale
        self.next_probe = now + scale(self.params.probe_interval)
        node = self._next_target()
        if node is None:
            return
        self.seq += 1
        self.probe = Probe(node.id, self.seq, now, now + scale(self.params.probe_timeout),
                           self.next_probe)
        out.append(self.message(node.address, wire.PING, {"seq": self.seq, "to": node.id},
                                now, node, entries=True))

    def _indirect(self, p: Probe, now: float, out: list[Outgoing]) -> None:
        p.indirect = True
        target = self.members.nodes.get(p.target)
        if target is None:
            return
        helpers = [n for n in self.members.nodes.values()
                   if n.state == ALIVE and n.id != p.target]
        helpers = self.rng.sample(helpers, min(len(helpers), self.params.indirect_checks))
        p.helpers = len(helpers)
        body = {"seq": p.seq, "to": p.target, "addr": list(target.address)}
        for h in helpers:
            out.append(self.message(h.address, wire.PING_REQ, body, now, h))

    def _relays_due(self, now: float, out: list[Outgoing]) -> None:
        for seq, r in list(self.relays.items()):
            if now >= r.nack_at:
                del self.relays[seq]
                out.append(self.message(r.requester, wire.NACK, {"seq": r.seq}, now,
                                        self.members.nodes.get(r.requester_id)))

    # ------------------------------------------------------------------ suspicion
    def _suspect_locally(self, nid: int, now: float) -> None:
        node = self.members.nodes.get(nid)
        if node is not None:
            self.on_suspect(nid, node.boot, node.incarnation, self.members.my_id, now,
                            "no ack, directly or through others")

    def on_suspect(self, nid: int, boot: int, n: int, by: int, now: float,
                   why: str = "", dead: bool = False) -> None:
        """``by`` suspects node ``nid`` at incarnation ``n`` (``dead``: it holds it dead,
        which here only makes our own refutation whole, if the node is us)."""
        node = self._accusable(nid, boot, n, dead)
        if node is None:
            return
        record = {"k": "s", "id": nid, "boot": boot, "n": n, "by": by}
        if node.state == SUSPECT:
            s = self.suspicions.get(nid)
            if s is not None and s.confirm(by):
                self.queue.push(nid, record)
            return
        self.events += self.members.suspect(nid, n, now, why or f"reported by node {by}")
        size = self.size()
        lo, hi = suspicion_bounds(size, self.params.suspicion_mult,
                                  self.params.suspicion_max_mult, self.params.probe_interval)
        cap = self.params.dead_timeout
        lo, hi = min(lo, cap), min(hi, cap)
        k = confirmations_wanted(size, self.params.suspicion_mult)
        self.suspicions[nid] = Suspicion(now, lo, hi, k, {by})
        self.queue.push(nid, record)

    def on_dead(self, nid: int, boot: int, n: int, by: int, now: float, why: str) -> None:
        """``by`` says node ``nid`` is dead at incarnation ``n``."""
        node = self._accusable(nid, boot, n, dead=True)
        if node is None:
            return
        if node.state == ALIVE and by != self.members.my_id:
            # a death we never heard suspected: the suspicion that precedes a death reaches
            # nearly everyone first, so this is mostly a node back from a partition telling
            # its stale view; suspect it here instead, which the accused can refute (taken
            # as a death, it made a node fence a job whose home was alive)
            self.on_suspect(nid, boot, n, by, now)
            return
        self.events += self.members.dead(nid, n, now, why)
        self.suspicions.pop(nid, None)
        self.queue.push(nid, {"k": "d", "id": nid, "boot": boot, "n": n, "by": by})

    def _accusable(self, nid: int, boot: int, n: int, dead: bool = False) -> Node | None:
        """The node an accusation (suspect or, with ``dead``, dead, at incarnation ``n``) is
        about, if it still applies: not to a node of another boot, at an older incarnation
        or dead already.  An accusation of ourselves is refuted here and applies to
        nothing."""
        if nid == self.members.my_id:
            if boot == self.members.me["boot"]:
                self._accused(n, dead)
            return None
        node = self.members.nodes.get(nid)
        if node is None or node.boot != boot or n < node.incarnation or node.state == DEAD:
            return None
        return node

    def _suspicions_due(self, now: float) -> None:
        for nid, s in list(self.suspicions.items()):
            if now >= s.deadline:
                del self.suspicions[nid]
                node = self.members.nodes.get(nid)
                if node is not None and node.state == SUSPECT:
                    self.on_dead(nid, node.boot, node.incarnation, self.members.my_id, now,
                                 f"suspect for {now - s.start:.1f}s, not refuted "
                                 f"({len(s.accusers)} accusers)")

    def _accused(self, n: int, dead: bool = False) -> None:
        """We are said to be suspect or (``dead``) dead at ``n``: refute with a higher
        incarnation.  Lifeguard counts it against our own health (we were too slow to
        answer).  A refutation of a suspicion is compact (id, boot, incarnation): every
        node passes it on retransmit_mult*log10(n) times, and our whole entry there made
        refutations the largest part of a cluster's bytes while stalled nodes were
        refuting (#19).  It goes whole while news of our flags or name is still going
        out, and after a death (see :meth:`_revival`)."""
        if n < self.members.incarnation:
            return
        self.members.me["n"] = n + 1
        self.members.beat()  # a fresh entry for the probes and acks to carry
        self.awareness.apply(1)
        pending = self.queue.pending(self.members.my_id)
        if dead or (pending is not None and pending["k"] == "a"):
            self.queue.push(self.members.my_id, {"k": "a", "e": self.members.own_entry()})
        else:
            self.queue.push(self.members.my_id, self._refutation(
                self.members.my_id, self.members.me["boot"], n + 1))

    @staticmethod
    def _refutation(nid: int, boot: int, n: int) -> dict[str, Any]:
        return {"k": "r", "id": nid, "boot": boot, "n": n}

    def _revival(self, node: Node, was_dead: bool, now: float) -> dict[str, Any]:
        """How to pass on that ``node`` is alive again: compact, unless it was dead
        (rare: a healed partition), when some nodes may have forgotten it (forget_after)
        and need its whole entry to take it back."""
        if was_dead:
            return {"k": "a", "e": self.members.aged(node, now)}
        return self._refutation(node.id, node.boot, node.incarnation)

    def _own_news(self) -> None:
        """Our flags, role or name changed: say so as a change, at a new incarnation,
        rather than wait for our entry to reach everyone with the figures."""
        sig = self.members.signature()
        if sig != self.signature:
            self.signature = sig
            self.members.me["n"] = self.members.incarnation + 1
            self.members.beat()  # receivers take an entry only with a higher hb
            self.queue.push(self.members.my_id, {"k": "a", "e": self.members.own_entry()})

    def _settle(self) -> None:
        """Drop the suspicions of nodes no longer suspect (refuted, restarted, gone)."""
        for nid in list(self.suspicions):
            node = self.members.nodes.get(nid)
            if node is None or node.state != SUSPECT:
                del self.suspicions[nid]

    # ------------------------------------------------------------------ news
    def learn(self, entry: dict[str, Any], now: float, source: Address | None,
              spread: bool = False) -> None:
        """Merge an entry.  A join, restart or revival heard as a change (or a HELLO) is
        passed on as a change, whole; a join or restart found in a page or beside a probe
        is old news to the cluster (else a newcomer's pull would make it pass the whole
        table on).  A revival (a suspect or dead node alive, at a higher incarnation) is
        passed on however it came: the suspicion went everywhere, and the refutation must
        follow it (heard first from the refuter itself, as its own entry, it spread no
        further, and the suspicion ran out elsewhere: false deaths of nodes stalled for
        2 s); as a compact refutation unless the change it came in carries news of the
        node's name or flags (or see :meth:`_revival`).  (A whole refutation, as a node
        of revision 0 is sent, passed on whole by everyone, cost the bytes compact
        refutations save: 7.8 KB/s against 7.0 at 5% loss, where relayed acks carried
        them.)"""
        prior = self.members.nodes.get(entry["id"])
        was_dead = prior is not None and prior.state == DEAD
        held = prior.entry if prior is not None else None  # merge replaces it, never edits
        events = self.members.merge(entry, now, self.auth, source)
        self.events += events
        if any(e.kind in LIVENESS_NEWS for e in events):
            node = self.members.nodes.get(entry["id"])
            if node is not None:
                revival = all(e.kind == "alive" for e in events)
                # compared only here, not for every entry heard (each probe carries two)
                news = not revival or held is None or settings_of(held) != settings_of(entry)
                if spread and news:
                    self.queue.push(node.id, {"k": "a", "e": self.members.aged(node, now)})
                elif revival:
                    self.queue.push(node.id, self._revival(node, was_dead, now))
                self.add_to_order(node.id)

    def _dead_here(self, nid: Any) -> bool:
        node = self.members.nodes.get(nid)
        return node is not None and node.state == DEAD

    def apply_record(self, r: dict[str, Any], now: float) -> None:
        """One change heard from another node."""
        if r["k"] == "a":
            self.learn(r["e"], now, None, spread=True)
        elif r["k"] == "r":
            was_dead = self._dead_here(r["id"])
            events = self.members.alive(r["id"], r["boot"], r["n"], now)
            self.events += events
            node = self.members.nodes.get(r["id"])
            if events and node is not None:  # a revival: the suspicion went everywhere
                self.queue.push(node.id, self._revival(node, was_dead, now))
                self.add_to_order(node.id)
        elif r["k"] == "l":
            events = self.members.merge(r["e"], now, self.auth)
            self.events += events
            if events:
                self.queue.push(r["e"]["id"], r)
        elif r["k"] == "s":
            self.on_suspect(r["id"], r["boot"], r["n"], r["by"], now)
        else:
            self.on_dead(r["id"], r["boot"], r["n"], r["by"], now,
                         f"reported by node {r['by']}")

    def _gossip_wanted(self) -> bool:
        return bool(self.queue) and \
            self.gossip_parked != (self.members.generation, self.queue.version)

    def _gossip(self, now: float, out: list[Outgoing]) -> None:
        """Changes to a few random members (alive, or suspect: they must hear to refute).
        If none could go to any member (a change about the one member we know is not
        sent to it), gossip is parked until the table or the queue changes: else an idle
        two-node cluster woke every ``gossip_interval`` for nothing (bench_idle).
        Gossip carries the changes only, not our entry: it goes out every
        ``gossip_interval`` to several members while changes last, and our entry there
        doubled its bytes (a cluster busy refuting suspicions of stalled nodes sent
        5.4 KB/s per node at 1000 nodes); our figures travel with the probes and acks."""
        self.next_gossip = now + self.params.gossip_interval
        live = self.members.live_nodes()
        sent = False
        for node in self.rng.sample(live, min(len(live), self.params.gossip_nodes)):
            msg = self.message(node.address, wire.GOSSIP, {}, now, node, own=False)
            if "b" in msg.body or "you" in msg.body:
                out.append(msg)
                sent = True
        if not sent and len(live) <= self.params.gossip_nodes:  # every member was asked
            self.gossip_parked = (self.members.generation, self.queue.version)
