"""The handlers of SWIM's datagram types, a part of :class:`omuscd.cluster.swim.Swim`
(kept apart so that each class stays readable): checks of each body's own fields, then
the answer (an ack, a relayed ack or nack, a probe for another node).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omuscd import wire
from omuscd.cluster import messages
from omuscd.cluster.messages import Address, Outgoing

NACK_FRACTION = 0.8  # a helper says "nack" this far into its probe timeout


@dataclass
class Relay:
    """A ping we send for another node (ping-req): its ack goes back to the requester."""

    requester: Address
    seq: int
    nack_at: float
    requester_id: int = 0  # its node id: the ack or nack goes in the form it reads


class Receiver:
    """Swim's handlers; every attribute used here is Swim's."""

    members: Any
    params: Any
    probe: Any
    relays: dict[int, Relay]
    seq: int
    awareness: Any
    sync: Any

    def message(self, dest: Address, mtype: int, body: dict[str, Any], now: float,
                node: Any = None, entries: bool = False) -> Outgoing:
        raise NotImplementedError

    def _handlers(self) -> dict[int, tuple[Any, Any]]:
        none = lambda body: None  # noqa: E731
        return {
            wire.PING: (lambda b: (messages.int_field(b, "seq"),
                                   messages.int_field(b, "to", 1, 2**32 - 1)), self._on_ping),
            wire.ACK: (lambda b: messages.int_field(b, "seq"), self._on_ack),
            wire.NACK: (lambda b: messages.int_field(b, "seq"), self._on_nack),
            wire.PING_REQ: (lambda b: (messages.int_field(b, "seq"),
                                       messages.int_field(b, "to", 1, 2**32 - 1),
                                       messages.check_address(b.get("addr"))),
                            self._on_ping_req),
            wire.GOSSIP: (none, lambda *a: None),
            wire.PUSH_PULL: (self.sync.check_request, self.sync.on_request),
            wire.SYNC: (self.sync.check_reply, self.sync.on_reply),
            wire.HELLO: (self.sync.check_hello, self.sync.on_hello),
            wire.LEAVE: (self.sync.check_hello, self.sync.on_leave),
        }

    def _on_ping(self, src: Address, sender: int, f: tuple[int, int], now: float,
                 out: list[Outgoing]) -> None:
        seq, to = f
        if to == self.members.my_id:  # not a ping meant for a node that was here before
            out.append(self.message(src, wire.ACK, {"seq": seq}, now,
                                    self.members.nodes.get(sender), entries=True))

    def _on_ack(self, src: Address, sender: int, seq: int, now: float,
                out: list[Outgoing]) -> None:
        p = self.probe
        if p is not None and seq == p.seq and not p.acked:
            p.acked = True
            if not p.indirect:
                self.awareness.apply(-1)
            return
        relay = self.relays.pop(seq, None)
        if relay is not None:
            out.append(self.message(relay.requester, wire.ACK, {"seq": relay.seq}, now,
                                    self.members.nodes.get(relay.requester_id)))

    def _on_nack(self, src: Address, sender: int, seq: int, now: float,
                 out: list[Outgoing]) -> None:
        p = self.probe
        if p is not None and seq == p.seq and p.indirect:
            p.nacks += 1

    def _on_ping_req(self, src: Address, sender: int, f: tuple[int, int, Address],
                     now: float, out: list[Outgoing]) -> None:
        seq, to, addr = f
        # only for a member (no stranger turns us into a pinger of other addresses),
        # and a bounded number at once
        if to == self.members.my_id or sender not in self.members.nodes or \
                len(self.relays) >= 64:
            return
        node = self.members.nodes.get(to)
        self.seq += 1
        self.relays[self.seq] = Relay(src, seq, now + NACK_FRACTION * self.params.probe_timeout,
                                      sender)
        out.append(self.message(node.address if node else addr, wire.PING,
                                {"seq": self.seq, "to": to}, now, node))
