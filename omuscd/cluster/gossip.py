"""The UDP half of a node: receive and decode datagrams, answer, gossip, depart.

:class:`Gossip` owns the cluster's UDP sockets, the :class:`Membership` table and the
packet counters.  It knows nothing of jobs or balancing: it tells the layers above what
happened through hooks it declares itself (memberlist's delegates):

- ``on_events(events)``: membership changed (join, suspect, dead, leave, incompatible,
  id moved); the daemon logs and publishes them.
- ``handlers[mtype](body, src, sender)``: a datagram of a *topology* type (the balancer's
  REQUEST and OFFER) from a known, authenticated node; a handler raises
  :class:`wire.WireError` for a malformed body, which is counted as a drop.
- ``on_load_jump()``: a node's gossiped load moved by ``balance_threshold`` or more.
- ``on_change()``: news arrived that may bring a membership deadline forward.
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
from omuscd.config import Config
from omuscd.events import Event

log = logging.getLogger("omuscd")

SYNC_REPLIERS = 4  # expected number of nodes answering a broadcast HELLO with the table

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

    def send_entries(self, mtype: int, entries: list[dict[str, Any]],
                     dest: tuple[str, int], **extra: Any) -> None:
        for data in wire.pack_entries(self.codec, mtype, entries, time.time(), extra):
            self._send(data, dest)

    def send_message(self, mtype: int, body: dict[str, Any], dest: tuple[str, int]) -> None:
        self._send(self.codec.encode(mtype, body, time.time()), dest)

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
                self._answer()
            return
        except wire.WireError as e:
            self.counters[e.reason] += 1
            log.debug("dropped datagram from %s:%d: %s", src[0], src[1], e)
            return
        hdr = pkt.header
        if hdr.node_id == self.codec.node_id and hdr.boot == self.boot:
            return  # our own broadcast, looped back
        self.counters["in"] += 1
        try:
            events = self._apply(pkt, src, now)
        except wire.WireError as e:
            self.counters[e.reason] += 1
            log.debug("dropped datagram from %s:%d: %s", src[0], src[1], e)
            return
        except IdClash as e:
            log.error("%s", e)
            self.on_id_clash(str(e))
            return
        self.on_events(events)
        self._answer()
        if self.members.my_id != self.codec.node_id:
            self._moved_id()
        if events:
            self.on_change()

    def _apply(self, pkt: wire.Packet, src: tuple[str, int], now: float) -> list[Event]:
        hdr, body = pkt.header, pkt.body
        auth = self.auth_label
        handler = self.handlers.get(hdr.mtype)
        if handler is not None:
            if self.security == "read-only" or hdr.node_id not in self.members.nodes:
                return []  # topology messages only between authenticated, known peers
            handler(body, src, hdr.node_id)
            return []
        if hdr.mtype in (wire.HELLO, wire.LEAVE):
            entry = wire.check_entry(body.get("entry"))
            if entry["id"] != hdr.node_id or entry["boot"] != hdr.boot:
                raise wire.WireError("malformed", "entry does not match the header")
            if hdr.mtype == wire.LEAVE:
                return self.members.merge({**entry, "st": "left"}, now, auth, src)
            new = self.members.is_new_or_back(entry["id"], entry["boot"])
            events = self.members.merge(entry, now, auth, src)
            live = max(1, len(self.members.live_nodes()))
            if body.get("reply") is True or (new and random.random() < SYNC_REPLIERS / live):
                self.send_entries(wire.SYNC, self.members.sync_entries(now), src)
            return events
        if hdr.mtype in (wire.REQUEST, wire.OFFER):
            return []  # a topology message nobody above listens to
        events = []
        for entry in wire.check_entries(body):
            mine = entry["id"] == hdr.node_id and entry["boot"] == hdr.boot
            node = self.members.nodes.get(entry["id"])
            before = float(node.entry["load"]) if node is not None else None
            events += self.members.merge(entry, now, auth, src if mine else None)
            node = self.members.nodes.get(entry["id"])
            if before is not None and node is not None and \
                    abs(float(node.entry["load"]) - before) >= self.cfg.balance_threshold:
                self.on_load_jump()  # a node's load jumped: look now, not next interval
        return events

    def _answer(self) -> None:
        """Send our own entry to whoever membership says must hear it directly."""
        while self.members.to_answer:
            dest = self.members.to_answer.pop()
            self.send_message(wire.HELLO, {"entry": self.members.own_entry(), "reply": False},
                              dest)

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

    # ------------------------------------------------------------------ sending rounds
    def gossip_round(self, now: float, announce: bool, **figures: Any) -> None:
        """One round: beat with this node's current ``figures`` (load, jobs, moves...),
        send a window of fresh entries to one node and, when ``announce``, say HELLO to
        the broadcast address (unless this node is quiet), to peers not heard of, and
        try a dead node again."""
        self.members.beat(**figures)
        target = self.members.gossip_target()
        if target is not None:
            self.send_entries(wire.GOSSIP, self.members.gossip_entries(
                now, self.cfg.gossip_window), target)
        if not announce:
            return
        me = self.members.own_entry()
        if self.cfg.broadcast and not self.members.has_flag("quiet"):
            self.send_message(wire.HELLO, {"entry": me, "reply": False},
                              (self.cfg.broadcast, self.cfg.port))
        known = {n.address for n in self.members.live_nodes()}
        for peer in self.cfg.peers:
            if peer not in known:
                self.send_message(wire.HELLO, {"entry": me, "reply": True}, peer)
        probe = self.members.probe_target()  # now and then, try a dead node again
        if probe is not None:
            self.send_entries(wire.GOSSIP, self.members.gossip_entries(
                now, self.cfg.gossip_window), probe)

    def depart(self) -> None:
        """Announce our departure so that others drop us at once instead of timing out."""
        self.members.beat()
        bye = {**self.members.own_entry(), "st": "left"}
        for dest in self._everyone():
            self.send_message(wire.LEAVE, {"entry": bye}, dest)


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
