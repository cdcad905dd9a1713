"""The UDP half of a node: receive and decode datagrams, hand them to SWIM, send.

:class:`Gossip` owns the cluster's UDP sockets, the :class:`Membership` table, the
:class:`Swim` failure detector that drives it (cluster/swim.py: pure, time passed in; this
module is its driver in the daemon, the simulator in the tests is another) and the packet
counters.  It knows nothing of jobs or balancing: it tells the layers above what
happened through hooks it declares itself (memberlist's delegates):

- ``on_events(events)``: membership changed (join, suspect, dead, leave, incompatible,
  id moved); the daemon logs and publishes them.
- ``handlers[mtype](body, src, sender)``: a datagram of a *topology* type (the balancer's
  REQUEST and OFFER) from a known, authenticated node; a handler raises
  :class:`wire.WireError` for a malformed body, which is counted as a drop.
- ``on_load_jump()``: a node's gossiped load moved by ``balance_threshold`` or more.
- ``on_change()``: a datagram moved SWIM's next deadline from ``due_hint`` (the one
  the timer loop sleeps towards): news to pass on brought it forward, or an ack came
  before the probe timeout and the loop need not wake for it.  The loop moves its alarm.
- ``on_id_clash(text)``: our explicitly given id is held by an earlier node: stop.

Logic takes time as arguments (``now`` on trio's clock for membership, ``wall`` for the
datagrams' timestamps), so tests can drive it with any clock.
"""

from __future__ import annotations

import logging
import random
import socket
import time
from collections.abc import Callable
from typing import Any

import trio

from omuscd import wire
from omuscd.cluster.membership import IdClash, Membership
from omuscd.cluster.swim import Outgoing, Swim, SwimParams
from omuscd.config import Config
from omuscd.events import Event

log = logging.getLogger("omuscd")

#: (body, source address, sender's node id) -> None; raises wire.WireError if malformed
TopologyHandler = Callable[[dict[str, Any], tuple[str, int], int], None]


def _nothing(*_: Any) -> None:
    return None


class Gossip:
    """Sockets, membership and counters of one node; see the module's docstring."""

    def __init__(self, cfg: Config, codec: wire.Codec, members: Membership, security: str):
        self.cfg = cfg
        self.codec = codec
        self.members = members
        self.security = security  # "key", "read-only" or "insecure"
        self.auth_label = {"key": "key", "insecure": "insecure"}.get(security, "unverified")
        self.counters: dict[str, int] = {"in": 0, "out": 0, "send-errors": 0,
                                         "channel-refused": 0,
                                         **{r: 0 for r in wire.DROP_REASONS}}
        self.raw: socket.socket | None = None
        self.sock: trio.socket.SocketType | None = None
        self.bsock: trio.socket.SocketType | None = None
        self.handlers: dict[int, TopologyHandler] = {}
        self.on_events: Callable[[list[Event]], None] = _nothing
        self.on_load_jump: Callable[[], None] = _nothing
        self.on_change: Callable[[], None] = _nothing
        self.on_id_clash: Callable[[str], None] = _nothing
        members.jump_threshold = cfg.balance_threshold
        broadcast = (cfg.broadcast, cfg.port) if cfg.broadcast else None
        self.swim = Swim(members, SwimParams.from_config(cfg), random.Random(),
                         auth=self.auth_label, broadcast=broadcast)
        self.due_hint = float("inf")  # SWIM's next deadline as the timer loop knows it

    @property
    def boot(self) -> int:
        return self.codec.boot

    # ------------------------------------------------------------------ sockets
    def open_sockets(self) -> None:
        """Bind the cluster UDP sockets.  We keep the stdlib socket for sending, which is
        synchronous and non-blocking (a full buffer drops the datagram, as a busy LAN
        would), and hand trio a wrapper of the same socket for receiving."""
        c = self.cfg
        self.raw = _udp_socket((c.address, c.port), "", reuse=False)
        self.sock = trio.socket.from_stdlib_socket(self.raw)
        if c.broadcast:
            # A socket bound to a unicast address never sees broadcasts: a second one,
            # bound to the broadcast address, receives them.
            self.bsock = trio.socket.from_stdlib_socket(
                _udp_socket((c.broadcast, c.port), " for broadcast discovery "
                            "(use --broadcast off)", reuse=True))

    def close(self) -> None:
        for s in (self.sock, self.bsock):
            if s is not None:
                s.close()

    def _send(self, data: bytes, dest: tuple[str, int]) -> None:
        assert self.raw is not None
        try:
            self.raw.sendto(data, dest)  # non-blocking; a full buffer drops, like the LAN
            self.counters["out"] += 1
        except (BlockingIOError, OSError) as e:
            self.counters["send-errors"] += 1
            log.debug("send to %s:%d failed: %s", dest[0], dest[1], e)

    def send_message(self, mtype: int, body: dict[str, Any], dest: tuple[str, int]) -> None:
        self._send(self.codec.encode(mtype, body, time.time()), dest)

    def send_all(self, outs: list[Outgoing]) -> None:
        for o in outs:
            self.send_message(o.mtype, o.body, o.dest)

    # ------------------------------------------------------------------ SWIM's clock
    def start(self, now: float) -> None:
        """Look for the cluster: HELLO to the peers and the broadcast address."""
        self.send_all(self.swim.start(now, list(self.cfg.peers)))

    def tick(self, now: float) -> None:
        """Whatever SWIM has due: probes, timeouts, changes, push-pull, rejoin."""
        self.send_all(self.swim.tick(now))
        self._told()

    def set_figures(self, **figures: Any) -> None:
        """This node's figures (load, jobs, moves...) for the datagrams that follow."""
        self.swim.set_figures(**figures)

    def _told(self) -> None:
        events = self.swim.take_events()
        if events:
            self.on_events(events)

    # ------------------------------------------------------------------ receiving
    async def receive(self, sock: trio.socket.SocketType) -> None:
        while True:
            try:
                data, src = await sock.recvfrom(65535)
            except OSError as e:  # ICMP errors surface here on Linux; keep going
                log.debug("receive: %s", e)
                continue
            self.handle_datagram(data, src[:2], trio.current_time(), time.time())

    def handle_datagram(self, data: bytes, src: tuple[str, int], now: float,
                        wall: float) -> None:
        """Decode, authenticate and apply one datagram.  Anything wrong drops it and is
        counted; nothing a peer sends can raise out of here."""
        try:
            pkt = self.codec.decode(data, wall)
        except wire.Incompatible as e:
            self.counters["incompatible"] += 1
            if (e.header.node_id, e.header.boot) != (self.members.my_id, self.boot):
                self.on_events(self.members.note_incompatible(
                    src, e.header.node_id, e.header.version, e.body, now, self.auth_label))
                self.send_all(self.swim.answers())
            return
        except wire.WireError as e:
            self.counters[e.reason] += 1
            log.debug("dropped datagram from %s:%d: %s", src[0], src[1], e)
            return
        hdr = pkt.header
        if hdr.node_id == self.codec.node_id and hdr.boot == self.boot:
            return  # our own broadcast, looped back
        self.counters["in"] += 1
        handler = self.handlers.get(hdr.mtype)
        if handler is not None or hdr.mtype in (wire.REQUEST, wire.OFFER):
            # topology messages only between authenticated, known peers
            if handler is not None and self.security != "read-only" and \
                    hdr.node_id in self.members.nodes:
                try:
                    handler(pkt.body, src, hdr.node_id)
                except wire.WireError as e:
                    self.counters[e.reason] += 1
                    log.debug("dropped datagram from %s:%d: %s", src[0], src[1], e)
            return
        try:
            outs = self.swim.handle(src, hdr.node_id, hdr.boot, hdr.mtype, pkt.body, now)
        except wire.WireError as e:
            self.counters[e.reason] += 1
            log.debug("dropped datagram from %s:%d: %s", src[0], src[1], e)
            return
        except IdClash as e:
            log.error("%s", e)
            self.on_id_clash(str(e))
            return
        self.send_all(outs)
        self._told()
        if self.members.my_id != self.codec.node_id:
            self._moved_id()
        if self.members.load_jumped:
            self.members.load_jumped = False
            self.on_load_jump()  # a node's load jumped: look now, not next interval
        if self.swim.next_due() != self.due_hint:
            self.on_change()

    def _everyone(self) -> set[tuple[str, int]]:
        """Every address that should hear a departure: live nodes, peers, broadcast."""
        targets = {n.address for n in self.members.live_nodes()} | set(self.cfg.peers)
        if self.cfg.broadcast:
            targets.add((self.cfg.broadcast, self.cfg.port))
        return targets

    def _moved_id(self) -> None:
        """After an id clash moved us: tell everyone the old identity is gone."""
        old = {**self.members.own_entry(), "id": self.codec.node_id, "st": "left"}
        for dest in self._everyone():
            self.send_message(wire.LEAVE, {"entry": old}, dest)
        self.codec.node_id = self.members.my_id

    def depart(self) -> None:
        """Announce our departure so that others drop us at once instead of suspecting."""
        self.send_all(self.swim.leave(trio.current_time()))


def _udp_socket(addr: tuple[str, int], hint: str, reuse: bool) -> socket.socket:
    """A non-blocking UDP socket.  Only the broadcast receiver may share its address
    (several nodes on one host listen on one broadcast address); a unicast socket must
    not, or a second daemon on the same address would silently steal half the traffic."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if reuse:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setblocking(False)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot bind UDP {addr[0]}:{addr[1]}{hint}: {e.strerror}") from None
    return sock
