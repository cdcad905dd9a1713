"""The simulator: nodes, the network and the clock tied together.

Each node is stepped only when something happens to it: a datagram arrives, or the time it
asked for with next_due() comes.  A step is handle() or tick(), then the node's Outgoing
datagrams are encoded with its real wire.Codec (keyed: the HMAC is computed and checked),
sent through the :class:`Network`, its events go to the observers and the watches, and its
next wake-up is queued.  Nothing scans all nodes per datagram; wake-ups superseded by a
later next_due() stay in the heap and are skipped when they come up.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from typing import Any

from omuscd import wire
from omuscd.events import Event
from tests.sim.clock import CALL, DELIVER, WAKE, Clock
from tests.sim.metrics import Watch
from tests.sim.network import NetConfig, Network
from tests.sim.node import SimNode
from tests.sim.protocol import Address, Factory

#: Simulated time 0 on the wall clock the datagrams carry (the codec checks their age).
WALL0 = 1_800_000_000.0
PORT = 4270
KEY = b"simulated cluster key, 32 bytes!"
#: More ticks than this at one instant means the protocol asks to be woken in the past
#: forever: a bug in it, reported instead of hanging the run.
MAX_TICKS_AT_ONCE = 1000

Observer = Callable[[SimNode, list[Event], float], None]


def address_of(index: int) -> str:
    """10.0.0.1 for node 0, then on: unique for up to 2**24 nodes."""
    n = index + 1
    return f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"


class Simulator:
    """Many nodes of ``factory`` over one network.  ``broadcast`` is an address that reaches
    every started node (as a LAN broadcast does), None for none."""

    def __init__(self, factory: Factory, net: NetConfig | None = None, seed: int = 1,
                 key: bytes | None = KEY, broadcast: Address | None = ("10.255.255.255", PORT)):
        self.factory = factory
        self.rng = random.Random(seed)
        self.seed = seed
        self.key = key
        self.broadcast = broadcast
        self.clock = Clock()
        self.net = Network(net or NetConfig(), random.Random(seed * 7919 + 1))
        self.nodes: list[SimNode] = []
        self.by_addr: dict[Address, SimNode] = {}
        self.by_id: dict[int, SimNode] = {}
        self.observers: list[Observer] = []
        self.watches: list[Any] = []
        self.steps = 0

    # ------------------------------------------------------------------ building
    @property
    def now(self) -> float:
        return self.clock.now

    def wall(self, t: float) -> float:
        return WALL0 + t

    def entry_for(self, index: int) -> dict[str, Any]:
        """A node's first entry, as the daemon builds it (daemon.py _initial_entry)."""
        addr = address_of(index)
        return {"id": index + 1, "boot": self.rng.getrandbits(63) or 1,
                "inc": int(self.wall(self.now) * 1e6), "hb": 0, "name": f"n{index}",
                "addr": addr, "port": PORT, "role": "peer", "rel": "1a0", "st": "up",
                "cpus": 4, "speed": 2400, "mem": 8000, "load": 0.0, "util": 0.0, "runq": 0,
                "jobs": 0, "flags": [], "moves": [0, 0]}

    def add_node(self, at: float | None = None, seeds: list[Address] | None = None
                 ) -> SimNode:
        """A new node that starts (joins via ``seeds``) at ``at`` (default: now)."""
        index = len(self.nodes)
        entry = self.entry_for(index)
        rng = random.Random(self.seed * 1_000_003 + index)
        codec = wire.Codec(self.key, entry["id"], entry["boot"], entry["inc"])
        node = SimNode(index, entry, self.factory(dict(entry), rng), codec)
        self.nodes.append(node)
        self.by_addr[node.address] = node
        self.by_id[node.id] = node
        self.call(self.now if at is None else at, self._start, node, list(seeds or []))
        return node

    def add_nodes(self, count: int, seeds: list[Address], start: float | None = None,
                  spacing: float = 0.0) -> list[SimNode]:
        t0 = self.now if start is None else start
        return [self.add_node(t0 + i * spacing, seeds) for i in range(count)]

    # ------------------------------------------------------------------ faults
    def call(self, at: float, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` at simulated time ``at``."""
        self.clock.at(at, CALL, fn, args)

    def crash(self, node: SimNode, at: float | None = None) -> None:
        """The node stops for good at ``at``: it receives and sends nothing more."""
        self.call(self.now if at is None else at, self._crash, node)

    def stall(self, node: SimNode, duration: float, at: float | None = None) -> None:
        """The node processes and sends nothing for ``duration`` seconds from ``at``, then
        catches up (a process stopped by SIGSTOP, or starved of CPU)."""
        self.call(self.now if at is None else at, self._stall, node, duration)

    def partition(self, groups: list[set[int]], at: float | None = None) -> None:
        """Cut each group of node indexes from all other nodes (until heal())."""
        self.call(self.now if at is None else at, self.net.partition, groups)

    def heal(self, at: float | None = None) -> None:
        self.call(self.now if at is None else at, self.net.heal)

    def _start(self, node: SimNode, seeds: list[Address]) -> None:
        node.started = True
        node.started_at = self.now
        self._finish(node, node.proto.start(self.now, seeds))

    def _crash(self, node: SimNode) -> None:
        node.crashed = True
        node.backlog.clear()
        for w in self.watches:
            w.forget(node)

    def _stall(self, node: SimNode, duration: float) -> None:
        if node.crashed:
            return
        until = self.now + duration
        if until > node.stalled_until:
            node.stalled_until = until
            self.call(until, self._resume, node)

    def _resume(self, node: SimNode) -> None:
        """Catch up: the datagrams that waited in the socket buffer, then the timers."""
        if node.crashed or self.now < node.stalled_until:
            return
        while node.backlog:
            data, src = node.backlog.popleft()
            self._receive(node, data, self.nodes[src])
        node.backlog_bytes = 0
        self._tick(node)

    # ------------------------------------------------------------------ running
    def run_until(self, end: float) -> None:
        """Take every event up to and including time ``end``; the clock ends at ``end``."""
        clock = self.clock
        heap = clock.heap
        nodes = self.nodes
        across = self.net.across
        while heap and heap[0][0] <= end:
            t, _, kind, a, b = heapq.heappop(heap)
            clock.now = t
            if kind == DELIVER:
                node = nodes[a]
                data, src = b
                if not node.started or node.crashed:
                    continue
                if across(src, a):
                    self.net.cut += 1
                    continue
                self.net.delivered += 1
                if t < node.stalled_until:
                    node.queue(data, src)
                    continue
                self._receive(node, data, nodes[src])
            elif kind == WAKE:
                node = a
                if t != node.wake_at or node.crashed or t < node.stalled_until:
                    continue  # superseded, or the node is gone or stopped
                node.wake_at = float("inf")
                self._tick(node)
            else:
                a(*b)
        clock.now = max(clock.now, end)

    def run_for(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    def run_until_true(self, cond: Callable[[], bool], timeout: float,
                       check_every: float = 0.1) -> float | None:
        """Run until ``cond()`` holds (checked every ``check_every`` simulated seconds);
        the simulated seconds it took, or None after ``timeout``."""
        start = self.now
        while True:
            if cond():
                return self.now - start
            if self.now - start >= timeout:
                return None
            self.run_until(min(self.now + check_every, start + timeout))

    # ------------------------------------------------------------------ one step
    def _receive(self, node: SimNode, data: bytes, src: SimNode) -> None:
        now = self.now
        try:
            packet = node.codec.decode(data, WALL0 + now)
        except wire.WireError:
            node.drops += 1
            return
        node.datagrams_in += 1
        h = packet.header
        try:
            out = node.proto.handle(src.address, h.node_id, h.boot, h.mtype, packet.body, now)
        except wire.WireError:  # a malformed body: dropped and counted, as the daemon does
            node.drops += 1
            out = []
        self._finish(node, out)

    def _tick(self, node: SimNode) -> None:
        now = self.now
        last, count = node.ticks_at
        count = count + 1 if last == now else 1
        node.ticks_at = (now, count)
        if count > MAX_TICKS_AT_ONCE:
            raise RuntimeError(f"{node} asks to be woken at {now} over and over "
                               f"(next_due {node.proto.next_due()})")
        self._finish(node, node.proto.tick(now))

    def _finish(self, node: SimNode, out: list[Any]) -> None:
        """After a step: send what it produced, publish its events, queue its wake-up."""
        self.steps += 1
        now = self.now
        if out:
            self._send(node, out, now)
        proto = node.proto
        events = proto.take_events()
        if events:
            for obs in self.observers:
                obs(node, events, now)
        for w in self.watches:
            w.check(node, now)
        due = proto.next_due()
        if due < now:
            due = now
        if due != node.wake_at:
            node.wake_at = due
            self.clock.at(due, WAKE, node)

    def _send(self, node: SimNode, out: list[Any], now: float) -> None:
        codec = node.codec
        net = self.net
        wall = WALL0 + now
        clock = self.clock
        for o in out:
            data = codec.encode(o.mtype, o.body, wall)
            size = len(data)
            node.bytes_sent += size
            node.datagrams_sent += 1
            if o.dest == self.broadcast:
                targets = [n for n in self.nodes if n is not node and n.started]
            else:
                dest = self.by_addr.get(tuple(o.dest))
                if dest is None:
                    net.unroutable += 1
                    continue
                targets = [dest]
            for dest in targets:
                latency = net.send(size)
                if latency is not None:
                    clock.at(now + latency, DELIVER, dest.index, (data, node.index))

    # ------------------------------------------------------------------ views
    def watch(self, subject: SimNode, want: Callable[[str | None], bool],
              fraction: float = 1.0) -> Watch:
        """Start timing how long until ``fraction`` of the live nodes see ``subject`` in a
        state ``want`` accepts (see :class:`Watch`)."""
        w = Watch(self, subject, want, fraction)
        self.watches.append(w)
        return w

    def live(self) -> list[SimNode]:
        return [n for n in self.nodes if n.live]

    def views_agree(self, want: str = "alive") -> bool:
        """Every live node sees every other live node in state ``want`` (O(N^2): for
        checks now and then, never per datagram)."""
        live = self.live()
        ids = [n.id for n in live]
        for obs in live:
            table = obs.proto.members.nodes
            for nid in ids:
                if nid != obs.id:
                    n = table.get(nid)
                    if n is None or n.state != want:
                        return False
        return True

    def converged(self, sample: int = 16) -> bool:
        """views_agree(), tried first on a few random observers (cheap when it is not)."""
        live = self.live()
        ids = [n.id for n in live]
        for obs in self.rng.sample(live, min(sample, len(live))):
            table = obs.proto.members.nodes
            if sum(1 for nid in ids if (n := table.get(nid)) is not None
                   and n.state == "alive") < len(ids) - 1:
                return False
        return self.views_agree()

    def bytes_sent(self) -> list[int]:
        return [n.bytes_sent for n in self.nodes]
