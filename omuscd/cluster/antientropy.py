"""SWIM's slow paths (cluster/swim.py): joining, push-pull anti-entropy, rejoining.

- Join: HELLO to the seeds (``--peer`` addresses, the broadcast address unless this node
  is quiet).  A node that hears a HELLO passes the newcomer on as a change and, if asked
  (a unicast HELLO) or by lot (a broadcast one: ``sync_repliers`` answers expected however
  large the cluster), answers with the first page of its table; the newcomer pulls the
  following pages from that one node, one datagram per round trip, until it has them all.
- Push-pull: every ``push_pull_interval`` (jittered) a node sends a digest of one slice
  of its table (node id, incarnation, state: a few bytes a node), from a rotating cursor,
  to one random member; the member answers with the entries of that slice the sender
  lacks or holds older, and its own digest of the slice; the sender then sends what the
  member lacks.  Each message is one datagram, so this costs the same at any cluster
  size, and over time it repairs whatever the piggybacked changes missed.
- Rejoin: every ``rejoin_interval`` (jittered) a node asks one dead member for a page (a
  healed partition: each side hears that the other thinks it dead and refutes), and says
  HELLO to peers it does not know alive.  A node that knows nobody alive says HELLO to the
  seeds again, after 1 s, 2 s, 4 s... up to ``rejoin_interval``.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator
from typing import Any, Protocol

from omuscd import wire
from omuscd.cluster import messages
from omuscd.cluster.membership import ALIVE, DEAD, SUSPECT, Membership, Node
from omuscd.cluster.messages import Address, Outgoing


class Swim(Protocol):
    """What the slow paths use of cluster/swim.py's Swim (declared here: no cycle)."""

    members: Membership
    params: Any
    rng: random.Random
    seeds: list[Address]
    broadcast: Address | None
    auth: str
    events: list[Any]
    queue: Any

    def message(self, dest: Address, mtype: int, body: dict[str, Any], now: float,
                node: Node | None = None, entries: bool = False) -> Outgoing: ...

    def learn(self, entry: dict[str, Any], now: float, source: Address | None,
              spread: bool = False) -> None: ...

    def on_suspect(self, nid: int, boot: int, n: int, by: int, now: float,
                   why: str = "", dead: bool = False) -> None: ...

    def size(self) -> int: ...

STATE_CODES = {ALIVE: "a", SUSPECT: "s", DEAD: "d"}
STATE_RANK = {ALIVE: 0, SUSPECT: 1, DEAD: 2}  # at one incarnation, later news ranks higher
END = 2**32  # past every node id
MAX_DIGEST = 3 * 300  # ints in a digest
FIRST_REJOIN = 1.0  # seconds before an isolated node says HELLO again (then doubling)
PULL_PATIENCE = 2.0  # seconds a join pull waits for its next page before giving up
#: A newcomer pulls the table a second time, from a random member, this long after its
#: start: nodes started together each pulled from a seed that knew only the first few.
REPULL_AFTER = 3.0


class AntiEntropy:
    """The slow paths of one :class:`Swim`; see the module's docstring."""

    def __init__(self, swim: Swim):
        self.swim = swim
        self.cursor = 0  # the next node id of our periodic pages
        self.next_push_pull = float("inf")
        self.next_rejoin = float("inf")
        self.backoff = FIRST_REJOIN
        self.pull_from: Address | None = None  # the node we pull the table from (join)
        self.pull_until = 0.0
        self.repull_at = float("inf")
        self._ids: list[int] = []  # the table's node ids, sorted (see ids_from)
        self._ids_key: tuple[int, int] = (0, 0)

    # ------------------------------------------------------------------ schedule
    def start(self, now: float) -> list[Outgoing]:
        s = self.swim
        # the first exchange early: a newcomer that joined along with many others
        # finds out soon what its pulls missed
        self.next_push_pull = now + self._jitter(min(2 * REPULL_AFTER,
                                                     s.params.push_pull_interval))
        self.next_rejoin = now + self._jitter(FIRST_REJOIN)
        self.repull_at = now + self._jitter(REPULL_AFTER)
        return self._hellos(now)

    def next_due(self) -> float:
        return min(self.next_push_pull, self.next_rejoin, self.repull_at)

    def _jitter(self, seconds: float) -> float:
        return seconds * (0.5 + self.swim.rng.random())

    def due(self, now: float) -> list[Outgoing]:
        out: list[Outgoing] = []
        s = self.swim
        if now >= self.next_push_pull:
            self.next_push_pull = now + self._jitter(s.params.push_pull_interval)
            live = s.members.live_nodes()
            if live:
                out.append(self.request(s.rng.choice(live), now))
        if now >= self.next_rejoin:
            self._rejoin(now, out)
        if now >= self.repull_at:
            self.repull_at = float("inf")
            live = s.members.live_nodes()
            if live and self.pull_from is None:
                node = s.rng.choice(live)
                self.pull_from, self.pull_until = node.address, now + PULL_PATIENCE
                out.append(s.message(node.address, wire.PUSH_PULL, {"from": 0, "join": True},
                                     now, node))
        if self.pull_from is not None and now >= self.pull_until:
            self.pull_from = None
        return out

    def _hellos(self, now: float) -> list[Outgoing]:
        """HELLO to the seeds (asking for the table) and to the broadcast address."""
        s = self.swim
        me = s.members.own_entry()
        out = [Outgoing(d, wire.HELLO, {"entry": me, "reply": True}) for d in s.seeds]
        if s.broadcast is not None and not s.members.has_flag("quiet"):
            out.append(Outgoing(s.broadcast, wire.HELLO, {"entry": me, "reply": False}))
        return out

    def _rejoin(self, now: float, out: list[Outgoing]) -> None:
        s = self.swim
        live = s.members.live_nodes()
        if not live:
            out += self._hellos(now)
            self.next_rejoin = now + self._jitter(self.backoff)
            self.backoff = min(2 * self.backoff, s.params.rejoin_interval)
            return
        self.backoff = FIRST_REJOIN
        self.next_rejoin = now + self._jitter(s.params.rejoin_interval)
        known = {n.address for n in live}
        me = s.members.own_entry()
        out += [Outgoing(p, wire.HELLO, {"entry": me, "reply": True})
                for p in s.seeds if p not in known]
        dead = [n for n in s.members.nodes.values() if n.state == DEAD]
        if dead:
            out.append(self.request(s.rng.choice(dead), now))

    # ------------------------------------------------------------------ pages
    def ids_from(self, lo: int, hi: int) -> Iterator[int]:
        """The table's node ids in [lo, hi), in order.  Sorted once per change of the
        table, not per page: a newcomer's pull asks for hundreds of pages."""
        nodes = self.swim.members.nodes
        key = (len(nodes), sum(nodes))
        if key != self._ids_key:
            self._ids, self._ids_key = sorted(nodes), key
        ids = self._ids
        for k in range(bisect.bisect_left(ids, lo), bisect.bisect_left(ids, hi)):
            if ids[k] in nodes:  # taken lazily: a page stops at its budget
                yield ids[k]

    def page(self, cursor: int, budget: int, now: float) -> tuple[list[dict], int, bool]:
        """Our table from node id ``cursor`` on, as much as fits ``budget`` bytes:
        (items, the next cursor, whether more follows)."""
        s = self.swim
        items: list[dict[str, Any]] = []
        nxt = cursor
        for nid in self.ids_from(cursor, END):
            node = s.members.nodes[nid]
            item = {"e": s.members.aged(node, now), "sw": STATE_CODES[node.state]}
            size = messages.json_size(item) + 1
            if size > budget:
                return items, nxt, True
            items.append(item)
            budget -= size
            nxt = nid + 1
        return items, nxt, False

    def _budget(self, share: float) -> int:
        s = self.swim
        mine = messages.json_size(s.members.own_entry())
        return int((s.params.body_budget - mine - 120) * share)

    def request(self, node: Node, now: float) -> Outgoing:
        """A push-pull: the digest of our slice from the cursor on."""
        dig, end = self.digest(self.cursor, END, self._budget(1.0))
        body = {"from": self.cursor, "to": end, "dig": dig}
        self.cursor = end if end < END else 0
        return self.swim.message(node.address, wire.PUSH_PULL, body, now, node)

    def digest(self, lo: int, hi: int, budget: int) -> tuple[list[int], int]:
        """[id, n, state rank, ...] of our nodes with ids in [lo, hi), as many as fit
        ``budget`` bytes, and the end of the slice they cover."""
        s = self.swim
        out: list[int] = []
        for nid in self.ids_from(lo, hi):
            node = s.members.nodes[nid]
            triple = [nid, node.incarnation, STATE_RANK[node.state]]
            budget -= messages.json_size(triple) - 1
            if budget < 0:
                return out, nid
            out += triple
        return out, hi

    def newer_than(self, dig: list[int], lo: int, hi: int, budget: int,
                   now: float) -> tuple[list[dict], bool]:
        """Our entries in [lo, hi) that the digest lacks or holds at older news, as many
        as fit ``budget``, and whether more differ."""
        s = self.swim
        theirs = {dig[i]: (dig[i + 1], dig[i + 2]) for i in range(0, len(dig), 3)}
        items: list[dict[str, Any]] = []
        for nid in self.ids_from(lo, hi):
            node = s.members.nodes[nid]
            mine = (node.incarnation, STATE_RANK[node.state])
            if nid in theirs and theirs[nid] >= mine:
                continue
            item = {"e": s.members.aged(node, now), "sw": STATE_CODES[node.state]}
            size = messages.json_size(item) + 1
            if size > budget:
                return items, True
            items.append(item)
            budget -= size
        return items, False

    def merge_page(self, items: list[tuple[dict[str, Any], str]], sender: int,
                   now: float) -> None:
        """Entries of another node's table: figures and "alive at n" as any entry; a
        node it holds suspect or dead is suspected here (memberlist: never dead at once
        on another's word), unless we do not know it at all."""
        s = self.swim
        for entry, sw in items:
            nid = entry["id"]
            if sw != "a" and nid != s.members.my_id and nid not in s.members.nodes:
                continue
            s.learn(entry, now, None)
            if sw != "a":
                s.on_suspect(nid, entry["boot"], entry.get("n", 0), sender, now,
                             f"node {sender} holds it {'suspect' if sw == 's' else 'dead'}",
                             dead=sw == "d")

    # ------------------------------------------------------------------ receiving
    @staticmethod
    def _slice(body: dict[str, Any]) -> tuple[int, int, list[int] | None]:
        lo = messages.int_field(body, "from", 0, END) if "from" in body else 0
        hi = messages.int_field(body, "to", 0, END) if "to" in body else END
        dig = body.get("dig")
        if dig is not None and not (isinstance(dig, list) and len(dig) % 3 == 0
                                    and len(dig) <= MAX_DIGEST
                                    and all(type(v) is int and 0 <= v < 2**53 for v in dig)):
            raise wire.WireError("malformed", "push-pull digest")
        return lo, hi, dig

    @classmethod
    def check_request(cls, body: dict[str, Any]) -> tuple[int, int, list[int] | None, bool]:
        return (*cls._slice(body), messages.bool_field(body, "join"))

    @classmethod
    def check_reply(cls, body: dict[str, Any]) -> tuple[int, bool, bool, int, int,
                                                       list[int] | None]:
        nxt = messages.int_field(body, "next", 0, END) if "next" in body else 0
        return (nxt, messages.bool_field(body, "more"), messages.bool_field(body, "join"),
                *cls._slice(body))

    @staticmethod
    def check_hello(body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        return wire.check_entry(body.get("entry")), body.get("reply") is True

    def _reply(self, src: Address, sender: int, cursor: int, join: bool, now: float,
               out: list[Outgoing]) -> None:
        items, nxt, more = self.page(cursor, self._budget(1.0 if join else 0.5), now)
        body = {"page": items, "next": nxt, "more": more, "join": join}
        out.append(self.swim.message(src, wire.SYNC, body, now,
                                     self.swim.members.nodes.get(sender)))

    def on_request(self, src: Address, sender: int,
                   f: tuple[int, int, list[int] | None, bool], now: float,
                   out: list[Outgoing]) -> None:
        """A join pull gets the next page; a digest gets what its sender lacks and our
        digest of the same slice."""
        lo, hi, dig, join = f
        if join or dig is None:
            self._reply(src, sender, lo, True, now, out)
            return
        s = self.swim
        mine, _ = self.digest(lo, hi, self._budget(0.5))
        items, more = self.newer_than(dig, lo, hi,
                                      self._budget(1.0) - messages.json_size(mine), now)
        body = {"page": items, "from": lo, "to": hi, "dig": mine, "more": more}
        out.append(s.message(src, wire.SYNC, body, now, s.members.nodes.get(sender)))

    def on_reply(self, src: Address, sender: int,
                 f: tuple[int, bool, bool, int, int, list[int] | None], now: float,
                 out: list[Outgoing]) -> None:
        """A page came back.  With a digest: send what its sender lacks (the last leg of
        a push-pull).  In a join pull: ask the same node for the next page."""
        nxt, more, join, lo, hi, dig = f
        s = self.swim
        if dig is not None and not join:
            items, _ = self.newer_than(dig, lo, hi, self._budget(1.0), now)
            if items:
                out.append(s.message(src, wire.SYNC, {"page": items}, now,
                                     s.members.nodes.get(sender)))
            if more and self.pull_from is None:
                # we lack more than a page (we joined with others at once, or were cut
                # off): pull that slice page by page, once
                self.pull_from, self.pull_until = src, now + PULL_PATIENCE
                out.append(s.message(src, wire.PUSH_PULL, {"from": lo, "join": True}, now,
                                     s.members.nodes.get(sender)))
            return
        if not join or self.pull_from not in (None, src):
            return
        if not more:
            self.pull_from = None
            return
        self.pull_from, self.pull_until = src, now + PULL_PATIENCE
        out.append(s.message(src, wire.PUSH_PULL, {"from": nxt, "join": True}, now,
                             s.members.nodes.get(sender)))

    def on_hello(self, src: Address, sender: int, f: tuple[dict[str, Any], bool],
                 now: float, out: list[Outgoing]) -> None:
        """A node looks for the cluster: pass it on, and answer with our first page if
        asked, or by lot so that a broadcast gets a few answers at any size."""
        s = self.swim
        entry, reply = f
        s.learn(entry, now, src, spread=True)
        if reply or s.rng.random() < s.params.sync_repliers / s.size():
            self._reply(src, sender, 0, True, now, out)

    def on_leave(self, src: Address, sender: int, f: tuple[dict[str, Any], bool],
                 now: float, out: list[Outgoing]) -> None:
        s = self.swim
        entry = {**f[0], "st": "left"}
        events = s.members.merge(entry, now, s.auth, src)
        s.events += events
        if events:
            s.queue.push(entry["id"], {"k": "l", "e": entry})
