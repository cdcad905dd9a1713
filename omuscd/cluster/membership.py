"""The node table: who is in the cluster, whether each is alive, and its last figures.

Two things are kept apart.  *Liveness* (alive, suspect, dead) is SWIM's judgement
(cluster/swim.py drives it through :meth:`Membership.suspect`, :meth:`Membership.dead`
and incarnation numbers in the entries); a node is never judged by how old its figures
are.  *Figures* (load, free memory, jobs, flags...) travel with SWIM's traffic, each
entry with its age in milliseconds, so a receiver knows when the node itself produced
them without synchronised clocks; ``nodes`` shows that age.  An entry's ``hb`` orders a
node's figures, its ``n`` (incarnation) orders what is said of its liveness: only the
node itself raises ``n``, to refute a suspicion, so "alive at n" beats "suspect at n-1".

This module is pure logic: time is passed in, so tests drive it with any clock.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

from omuscd.events import Event

log = logging.getLogger("omuscd.cluster.membership")

ALIVE, SUSPECT, DEAD, INCOMPATIBLE = "alive", "suspect", "dead", "incompatible"
STATES = (ALIVE, SUSPECT, DEAD, INCOMPATIBLE)
#: A fresh id taken after a clash comes from above the address-derived range.
MOVED_ID_RANGE = (65536, 2**31 - 1)


class IdClash(Exception):
    """Our node id was given explicitly and another, earlier node holds it."""


@dataclass(slots=True)
class Node:
    """Our view of one node: its last entry (wire form) plus our judgement of it.
    (Slots: a table of 5000 of them in each of 5000 simulated nodes, tests/bench.)"""

    entry: dict[str, Any]
    state: str
    heard: float  # our clock's estimate of when the node produced its figures
    since: float  # when ``state`` was entered
    auth: str  # "key", "unverified" or "insecure"
    address: tuple[str, int]  # where to send to it
    incarnation: int = 0  # SWIM's: the highest ``n`` we know the node at

    @property
    def id(self) -> int:
        return int(self.entry["id"])

    @property
    def name(self) -> str:
        return str(self.entry["name"])

    @property
    def boot(self) -> int:
        return int(self.entry["boot"])

    def age(self, now: float) -> float:
        """Seconds since the node produced the figures we hold."""
        return max(0.0, now - self.heard)

    def view(self, now: float) -> dict[str, Any]:
        """What ``nodes`` and ``node`` show (JSON form).  ``last_heard`` (and ``age``) is
        the age of the figures, not a judgement of liveness: that is ``state``."""
        e = self.entry
        return {
            "id": e["id"], "name": e["name"], "address": e["addr"], "port": e["port"],
            "role": e["role"], "state": self.state, "load": round(float(e["load"]), 2),
            "util": round(float(e["util"]), 1), "runq": e["runq"], "cpus": e["cpus"],
            "speed": e["speed"], "mem_free_mb": e["mem"], "jobs": e["jobs"],
            "release": e["rel"], "flags": list(e["flags"]), "auth": self.auth,
            "moved_in": e.get("moves", [0, 0])[0], "moved_out": e.get("moves", [0, 0])[1],
            "last_heard": round(self.age(now), 1), "age": round(self.age(now), 1),
            "incarnation": self.incarnation,
            "state_since": round(max(0.0, now - self.since), 1),
        }


#: Figures older than this many times the interval they normally arrive in are too old
#: to balance on (cluster/view.py's why_not says "figures N s old").
STALE_MULT = 5.0


@dataclass
class Timing:
    forget_after: float = 3600.0
    probe_interval: float = 0.5
    load_interval: float = 1.0

    def figures_interval(self, n: int) -> float:
        """About how old another node's figures normally are, in a cluster of ``n``: a
        node samples its load every ``load_interval`` and its entry rides on SWIM's
        datagrams, whose bytes per node do not grow with the cluster, so a given node's
        figures reach us directly once in about n/2 probe periods (we probe it, it probes
        us), and as often again beside other nodes' probes: n/4 periods.  The simulator
        measured the median age at about n/5 periods (8 to 200 nodes), p99 at 2n/5."""
        return max(self.load_interval, self.probe_interval * n / 4)

    def stale_after(self, n: int) -> float:
        """Figures older than this are not trusted for balancing: STALE_MULT times
        :meth:`figures_interval` (5 s at 2 to 8 nodes, 62 s at 100, 625 s at 1000 with the
        default timings; about one figure in a thousand of a healthy cluster is older)."""
        return STALE_MULT * self.figures_interval(n)


#: Fields of our own entry that are figures, sent as they are; a change of any other
#: field (flags, role, name) is news and is spread as a change (cluster/swim.py).
FIGURES = ("load", "util", "runq", "mem", "jobs", "moves", "hb")


def settings_of(entry: dict[str, Any]) -> tuple[Any, ...]:
    """An entry without its figures, incarnation and age (its name, flags, role...): what
    a node says as news when it changes."""
    return tuple((k, str(v)) for k, v in sorted(entry.items())
                 if k not in FIGURES and k not in ("n", "age"))


@dataclass
class Membership:
    """The node table of one daemon.  ``me`` is our own entry; only methods change state
    and every change is returned as :class:`Event` objects for the caller to publish."""

    me: dict[str, Any]
    timing: Timing = field(default_factory=Timing)
    id_explicit: bool = False
    rng: random.Random = field(default_factory=random.Random)
    nodes: dict[int, Node] = field(default_factory=dict)
    incompatible: dict[tuple[str, int], Node] = field(default_factory=dict)
    departed: dict[int, tuple[int, int]] = field(default_factory=dict)  # id -> (boot, hb)
    clash_warned: set[int] = field(default_factory=set)
    #: Nodes to send our own entry to directly: a later claimant of our id (a third
    #: party may show it instead of us, so it might never hear of us otherwise) and a
    #: newly seen incompatible node (so that it lists us too).
    to_answer: list[tuple[str, int]] = field(default_factory=list)
    #: A node's load moved by ``jump_threshold`` or more since the last look (the
    #: balancer looks at once); the reader clears it.
    jump_threshold: float = float("inf")
    load_jumped: bool = False
    #: Raised at every change of the node set or of a node's state (caches key on it).
    generation: int = 0
    _live: tuple[int, list[Node]] = (-1, [])

    # ------------------------------------------------------------------ our own entry
    @property
    def my_id(self) -> int:
        return int(self.me["id"])

    @property
    def incarnation(self) -> int:
        return int(self.me.get("n", 0))

    def beat(self, **fields: Any) -> None:
        """New figures: refresh the fields given and raise ``hb`` (their order)."""
        self.me.update(fields)
        self.me["hb"] += 1

    def own_entry(self) -> dict[str, Any]:
        return {**self.me, "age": 0}

    def set_flag(self, flag: str, on: bool) -> None:
        """Raise or lower one of this node's flags ("criu", "blocked", "quiet", ...); the
        next datagram carries it.  The one writer of ``me["flags"]``."""
        flags = set(self.me["flags"])
        if on:
            flags.add(flag)
        else:
            flags.discard(flag)
        self.me["flags"] = sorted(flags)

    def has_flag(self, flag: str) -> bool:
        return flag in self.me["flags"]

    def set_role(self, role: str) -> None:
        """This node's topology role, sent from the next datagram on."""
        self.me["role"] = role

    def signature(self) -> tuple[Any, ...]:
        """Our entry without its figures: when it changes, others must hear of it soon."""
        return settings_of(self.me)

    # ------------------------------------------------------------------ merging news
    def merge(self, entry: dict[str, Any], now: float, auth: str,
              source: tuple[str, int] | None = None) -> list[Event]:
        """Merge one (already validated) entry: its figures if newer (``hb``), and "alive
        at incarnation n" if ``n`` is above what we know.  ``source`` is set when the
        entry is the sender's own, so we learn the address it really speaks from."""
        nid = int(entry["id"])
        origin = now - entry["age"] / 1000.0
        entry = {k: v for k, v in entry.items() if k != "age"}
        n = int(entry.get("n", 0))
        if nid == self.my_id:
            return self._own_id_seen(entry)
        if entry["st"] == "left":
            return self._leave(entry, now)
        gone = self.departed.get(nid)
        if gone is not None:
            if gone[0] == entry["boot"] and entry["hb"] <= gone[1]:
                return []  # stale news of a node that left
            del self.departed[nid]
        address = source or (entry["addr"], entry["port"])
        node = self.nodes.get(nid)
        if node is None:
            self.nodes[nid] = Node(entry, ALIVE, origin, now, auth, address, n)
            self.generation += 1
            return [Event("join", f"node {nid} ({entry['name']}) at {entry['addr']} joined",
                          {"node": nid, "name": entry["name"], "address": entry["addr"]})]
        old = node.entry
        if entry["boot"] != old["boot"]:
            if (entry["inc"], entry["boot"]) < (old["inc"], old["boot"]):
                return []  # an older incarnation (or the loser of an id clash)
            self.nodes[nid] = Node(entry, ALIVE, origin, now, auth, address, n)
            self.generation += 1
            return [Event("restart", f"node {nid} ({entry['name']}) restarted",
                          {"node": nid, "name": entry["name"]})]
        if entry["hb"] > old["hb"]:
            self._note_jump(old, entry)
            node.entry = entry
            node.heard = max(node.heard, origin)
        if source is not None:
            node.address = source
        return self._incarnation(node, n, now)

    def _incarnation(self, node: Node, n: int, now: float) -> list[Event]:
        """Node ``node`` is alive at incarnation ``n``: a revival if it is above what we
        know and the node was suspect or dead."""
        if n <= node.incarnation:
            return []
        node.incarnation = n
        node.entry = {**node.entry, "n": n}
        if node.state == ALIVE:
            return []
        was = node.state
        node.state, node.since = ALIVE, now
        self.generation += 1
        return [Event("alive", f"node {node.id} ({node.name}) is alive again (was {was})",
                      {"node": node.id, "name": node.name})]

    def _note_jump(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        if abs(float(new["load"]) - float(old["load"])) >= self.jump_threshold:
            self.load_jumped = True

    # ------------------------------------------------------------------ SWIM's verdicts
    def alive(self, nid: int, boot: int, n: int, now: float) -> list[Event]:
        """Node ``nid`` (of boot ``boot``) says it is alive at incarnation ``n``: a
        refutation without its entry (cluster/swim.py's compact record).  Nothing for a
        node we do not know at that boot: its next datagram or a push-pull page will say."""
        node = self.nodes.get(nid)
        if node is None or node.boot != boot:
            return []
        return self._incarnation(node, n, now)

    def suspect(self, nid: int, n: int, now: float, why: str) -> list[Event]:
        """Node ``nid`` is suspect at incarnation ``n`` (ignored if it is known at a
        higher one, or already suspect or dead)."""
        node = self.nodes.get(nid)
        if node is None or n < node.incarnation or node.state != ALIVE:
            return []
        node.incarnation = n
        node.state, node.since = SUSPECT, now
        self.generation += 1
        return [Event("suspect", f"node {nid} ({node.name}) is suspect: {why}",
                      {"node": nid, "name": node.name})]

    def dead(self, nid: int, n: int, now: float, why: str) -> list[Event]:
        """Node ``nid`` is dead at incarnation ``n`` (only a higher ``n`` revives it)."""
        node = self.nodes.get(nid)
        if node is None or n < node.incarnation or node.state == DEAD:
            return []
        node.incarnation = n
        node.state, node.since = DEAD, now
        self.generation += 1
        return [Event("dead", f"node {nid} ({node.name}) is dead: {why}",
                      {"node": nid, "name": node.name})]

    def _own_id_seen(self, entry: dict[str, Any]) -> list[Event]:
        """Someone speaks with our node id.  Our own echo is ignored; another boot is a
        clash: the node that started later moves (or refuses, if its id was explicit)."""
        if entry["boot"] == self.me["boot"]:
            return []
        if entry["st"] == "left":
            return []  # that node has gone: nothing to clash with
        older = (entry["inc"], entry["boot"]) < (self.me["inc"], self.me["boot"])
        if older and (entry["addr"], entry["port"]) == (self.me["addr"], self.me["port"]):
            # our own previous life, still in others' gossip: no two daemons can hold
            # one address and port at once, so this is a restart, not a clash
            return []
        other = f"{entry['name']} at {entry['addr']}"
        if (self.me["inc"], self.me["boot"]) > (entry["inc"], entry["boot"]):
            if self.id_explicit:
                raise IdClash(f"node id {self.my_id} is already used by {other}, which "
                              "started earlier; choose another with --node-id")
            old_id = self.my_id
            new_id = self._free_id()
            self.me["id"] = new_id
            self.me["hb"] += 1
            log.warning("node id %d is already used by %s, which started earlier; "
                        "this node takes id %d instead", old_id, other, new_id)
            return [Event("clash", f"node id {old_id} also used by {other}; "
                          f"this node moved to id {new_id}",
                          {"old_id": old_id, "node": new_id})]
        self.to_answer.append((entry["addr"], entry["port"]))
        if entry["boot"] not in self.clash_warned:
            self.clash_warned.add(entry["boot"])
            log.warning("node id %d is also claimed by %s, which started later and will "
                        "move", self.my_id, other)
            return [Event("clash", f"node id {self.my_id} also claimed by {other}; "
                          "it started later and will move", {"node": self.my_id})]
        return []

    def _free_id(self) -> int:
        while True:
            nid = self.rng.randint(*MOVED_ID_RANGE)
            if nid not in self.nodes and nid != self.my_id:
                return nid

    def _leave(self, entry: dict[str, Any], now: float) -> list[Event]:
        nid = int(entry["id"])
        node = self.nodes.get(nid)
        if node is None or node.entry["boot"] != entry["boot"]:
            if node is None:
                self.departed[nid] = (entry["boot"], entry["hb"])
            return []
        del self.nodes[nid]
        self.generation += 1
        self.departed[nid] = (entry["boot"], entry["hb"])
        return [Event("leave", f"node {nid} ({node.name}) left the cluster",
                      {"node": nid, "name": node.name})]

    def note_incompatible(self, source: tuple[str, int], node_id: int, version: int,
                          body: dict[str, Any], now: float, auth: str) -> list[Event]:
        """An authentic datagram of another protocol version: list its sender, never use
        it.  Only the stable header is trusted; the body is read for a name if it has one."""
        entry = next((v for v in (body.get("me"), body.get("entry")) if isinstance(v, dict)),
                     {})
        name = entry.get("name") if isinstance(entry.get("name"), str) else "?"
        rel = entry.get("rel") if isinstance(entry.get("rel"), str) else f"v{version}"
        new = source not in self.incompatible
        self.incompatible[source] = Node(
            {"id": node_id, "name": name[:64], "addr": source[0], "port": source[1],
             "role": "?", "load": 0.0, "util": 0.0, "runq": 0, "cpus": 0, "speed": 0,
             "mem": 0, "jobs": 0, "rel": rel[:32], "flags": [], "proto": version},
            INCOMPATIBLE, now, now, auth, source)
        if new:
            self.to_answer.append(source)
            return [Event("incompatible", f"node {node_id} ({name}) at {source[0]} speaks "
                          f"protocol version {version}; it is listed but never used",
                          {"node": node_id, "version": version})]
        return []

    # ------------------------------------------------------------------ time passing
    def sweep(self, now: float) -> tuple[list[Event], float]:
        """Forget nodes dead for ``forget_after`` (and incompatible ones silent as long).
        Returns the events and when to sweep next."""
        t = self.timing
        events: list[Event] = []
        nxt = now + t.forget_after
        for nid, node in list(self.nodes.items()):
            if node.state != DEAD:
                continue
            if now - node.since >= t.forget_after:
                del self.nodes[nid]
                self.generation += 1
                events.append(Event("forget", f"node {nid} ({node.name}) forgotten",
                                    {"node": nid}))
            else:
                nxt = min(nxt, node.since + t.forget_after)
        for src, node in list(self.incompatible.items()):
            if now - node.heard >= t.forget_after:
                del self.incompatible[src]
            else:
                nxt = min(nxt, node.heard + t.forget_after)
        return events, nxt

    # ------------------------------------------------------------------ what to send
    def live_nodes(self) -> list[Node]:
        """The nodes alive or suspect (a copy; computed once per generation: SWIM asks
        for it with every datagram)."""
        if self._live[0] != self.generation:
            self._live = (self.generation, [n for n in self.nodes.values()
                                            if n.state in (ALIVE, SUSPECT)])
        return list(self._live[1])

    def live_count(self) -> int:
        if self._live[0] != self.generation:
            self.live_nodes()
        return len(self._live[1])

    def aged(self, node: Node, now: float) -> dict[str, Any]:
        """A node's entry as sent: its figures with their current age."""
        return {**node.entry, "n": node.incarnation,
                "age": max(0, round((now - node.heard) * 1000))}

    # ------------------------------------------------------------------ lookups
    def find(self, key: str) -> Node | None:
        """A node by id or by name; ValueError if a name is ambiguous."""
        if key.isdigit():
            return self.nodes.get(int(key))
        matches = [n for n in self.nodes.values() if n.name == key]
        if len(matches) > 1:
            raise ValueError(f"name {key!r} is ambiguous: ids "
                             + ", ".join(str(n.id) for n in matches))
        return matches[0] if matches else None

    def find_incompatible(self, key: str) -> Node | None:
        """A node of another protocol version by id or name: listed, never used (so that
        a refusal can say why rather than that there is no such node)."""
        return next((n for n in self.incompatible.values()
                     if key in (str(n.entry["id"]), n.entry["name"])), None)

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in STATES}
        for n in self.nodes.values():
            out[n.state] += 1
        out[INCOMPATIBLE] += len(self.incompatible)
        return out
