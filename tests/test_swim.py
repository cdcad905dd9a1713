"""SWIM and Lifeguard (omuscd/cluster/swim.py and its siblings), with explicit time.

A few :class:`Swim` objects talk through :class:`Net`, a tiny in-test loop that delivers
their :class:`Outgoing` datagrams after a fixed delay on a clock the test moves; it can
drop a node (crashed or stalled), cut links both ways (a partition) and count bytes.  The
full simulator (loss, many nodes, benchmarks) is tests/sim/'s.
"""

from __future__ import annotations

import heapq
import itertools
import json
import random
from typing import Any

import pytest

from omuscd import wire
from omuscd.cluster.broadcasts import TransmitQueue, retransmit_limit
from omuscd.cluster.membership import ALIVE, DEAD, SUSPECT, Membership
from omuscd.cluster.suspicion import (
    Awareness,
    Suspicion,
    confirmations_wanted,
    suspicion_bounds,
)
from omuscd.cluster.swim import Outgoing, Swim, SwimParams
from tests.fakes import wire_entry

OVERHEAD = wire.HEADER.size + wire.TAG_LEN


def addr(i: int) -> tuple[str, int]:
    return (f"10.0.{i // 256}.{i % 256}", 4270)


def make(i: int, params: SwimParams | None = None, **entry: Any) -> Swim:
    me = wire_entry(i, boot=1000 + i, inc=i, hb=0, addr=addr(i)[0], name=f"n{i}", **entry)
    me.pop("age")
    return Swim(Membership(me, rng=random.Random(i)), params or SwimParams(),
                random.Random(i * 7 + 1))


class Net:
    """Swim objects joined by a delivering loop on a test-driven clock."""

    def __init__(self, n: int, params: SwimParams | None = None, delay: float = 0.002):
        self.now = 0.0
        self.delay = delay
        self.nodes = {i: make(i, params) for i in range(1, n + 1)}
        self.by_addr = {addr(i): i for i in self.nodes}
        self.down: set[int] = set()  # crashed or stalled: neither ticks nor receives
        self.cut: set[tuple[int, int]] = set()  # (src, dst) links that drop everything
        self.queue: list[tuple[float, int, int, int, Outgoing]] = []
        self.count = 0
        self.sent: dict[int, int] = {}  # bytes per node
        self.largest = 0  # the largest datagram

    def send(self, src: int, outs: list[Outgoing]) -> None:
        for o in outs:
            size = len(json.dumps(o.body, separators=(",", ":"))) + OVERHEAD
            self.largest = max(self.largest, size)
            self.sent[src] = self.sent.get(src, 0) + size
            dst = self.by_addr.get(o.dest)
            if dst is not None:
                self.count += 1
                heapq.heappush(self.queue, (self.now + self.delay, self.count, src, dst, o))

    def start(self) -> None:
        for i, s in self.nodes.items():
            self.send(i, s.start(self.now, [addr(1)] if i != 1 else []))

    def partition(self, a: set[int], b: set[int]) -> None:
        self.cut = {(x, y) for x in a for y in b} | {(y, x) for x in a for y in b}

    def run(self, until: float) -> None:
        while True:
            due = min([s.next_due() for i, s in self.nodes.items() if i not in self.down]
                      + [until])
            head = self.queue[0][0] if self.queue else until
            t = max(self.now, min(due, head))
            if t >= until:
                self.now = until
                return
            self.now = t
            if head <= due:
                _, _, src, dst, o = heapq.heappop(self.queue)
                if dst in self.down or (src, dst) in self.cut:
                    continue
                me = self.nodes[src].members.me
                self.send(dst, self.nodes[dst].handle(addr(src), me["id"], me["boot"],
                                                      o.mtype, o.body, self.now))
            else:
                for i, s in self.nodes.items():
                    if i not in self.down and s.next_due() <= self.now:
                        self.send(i, s.tick(self.now))

    def state(self, viewer: int, of: int) -> str | None:
        node = self.nodes[viewer].members.nodes.get(of)
        return node.state if node else None


def kinds(swim: Swim) -> list[str]:
    return [e.kind for e in swim.take_events()]


def body_of(outs: list[Outgoing], mtype: int) -> list[Outgoing]:
    return [o for o in outs if o.mtype == mtype]


def tick_until(s: Swim, mtype: int, limit: float = 30.0) -> tuple[float, list[Outgoing]]:
    """Tick ``s`` at each of its due times until it sends a datagram of ``mtype``."""
    while True:
        t = s.next_due()
        assert t < limit
        found = body_of(s.tick(t), mtype)
        if found:
            return t, found


def pair() -> tuple[Swim, Swim]:
    """Nodes 1 and 2, each knowing the other (through 2's HELLO)."""
    a, b = make(1), make(2)
    a.start(0.0, [])
    [hello] = b.start(0.0, [addr(1)])
    for o in a.handle(addr(2), 2, 1002, hello.mtype, hello.body, 0.0):
        b.handle(addr(1), 1, 1001, o.mtype, o.body, 0.0)
    assert 2 in a.members.nodes and 1 in b.members.nodes
    a.take_events()
    b.take_events()
    return a, b


# ---------------------------------------------------------------------- the probe cycle


def test_probe_and_ack_keep_a_node_alive_and_carry_its_figures():
    a, b = pair()
    a.queue, b.queue = TransmitQueue(), TransmitQueue()  # the news of the join sent
    b.set_figures(load=3.5, mem=777)
    t, [ping] = tick_until(a, wire.PING)
    assert ping.dest == addr(2) and ping.body["to"] == 2
    [ack] = b.handle(addr(1), 1, 1001, wire.PING, ping.body, t + 0.01)
    assert ack.mtype == wire.ACK and ack.body["seq"] == ping.body["seq"]
    a.handle(addr(2), 2, 1002, wire.ACK, ack.body, t + 0.02)
    assert a.probe.acked
    # nothing more is due for this probe: the next wake-up is the next period
    assert a.next_due() == pytest.approx(t + a.params.probe_interval)
    a.tick(t + a.params.probe_interval + 0.01)
    assert a.members.nodes[2].state == ALIVE
    assert a.members.nodes[2].entry["load"] == 3.5 and a.members.nodes[2].entry["mem"] == 777
    assert a.awareness.score == 0


def test_no_ack_asks_helpers_whose_relayed_ack_saves_the_node():
    """1 cannot reach 3 directly (a lost route); 2 pings 3 for it and relays the ack."""
    net = Net(3)
    net.start()
    net.run(3.0)
    assert all(net.state(i, j) == ALIVE for i in net.nodes for j in net.nodes if i != j)
    net.cut = {(1, 3), (3, 1)}
    for s in net.nodes.values():
        s.take_events()
    net.run(20.0)
    assert net.state(1, 3) == ALIVE and net.state(3, 1) == ALIVE
    assert "suspect" not in kinds(net.nodes[1]) + kinds(net.nodes[3])
    assert net.nodes[1].awareness.score == 0


def test_helper_says_nack_when_the_target_is_silent_too():
    _a, b = pair()
    b.members.merge({**wire_entry(3, boot=1003, addr=addr(3)[0]), "age": 0}, 0.0, "key")
    out = b.handle(addr(1), 1, 1001, wire.PING_REQ,
                   {"seq": 41, "to": 3, "addr": list(addr(3))}, 1.0)
    [ping] = body_of(out, wire.PING)
    assert ping.dest == addr(3) and ping.body["to"] == 3
    assert b.next_due() <= 1.0 + 0.8 * b.params.probe_timeout
    [nack] = body_of(b.tick(1.0 + b.params.probe_timeout), wire.NACK)
    assert nack.dest == addr(1) and nack.body["seq"] == 41
    # a relayed ack instead, had 3 answered in time
    out = b.handle(addr(1), 1, 1001, wire.PING_REQ,
                   {"seq": 42, "to": 3, "addr": list(addr(3))}, 2.0)
    [ping] = body_of(out, wire.PING)
    [ack] = b.handle(addr(3), 3, 1003, wire.ACK, {"seq": ping.body["seq"]}, 2.05)
    assert ack.dest == addr(1) and ack.mtype == wire.ACK and ack.body["seq"] == 42
    assert b.relays == {}
    # a stranger cannot make b ping addresses for it
    assert b.handle(("10.9.9.9", 4270), 99, 1099, wire.PING_REQ,
                    {"seq": 43, "to": 3, "addr": ["10.9.9.8", 4270]}, 3.0) == []


def test_crashed_node_is_suspect_then_dead_everywhere():
    net = Net(6)
    net.start()
    net.run(4.0)
    for s in net.nodes.values():
        s.take_events()
    net.down.add(4)
    crash = net.now
    net.run(crash + 12.0)
    for i in net.nodes:
        if i != 4:
            assert net.state(i, 4) == DEAD
            assert kinds(net.nodes[i]) == ["suspect", "dead"]
            since = net.nodes[i].members.nodes[4].since - crash
            # bounded by the first probe of it, the maximum suspicion timeout at six
            # nodes (mult 4, max mult 6: 12 probe intervals) and its spread
            assert since < 2 + 12 * net.nodes[i].params.probe_interval
    assert all(net.state(i, j) == ALIVE for i in net.nodes for j in net.nodes
               if 4 not in (i, j) and i != j)


def test_a_suspected_node_refutes_with_a_higher_incarnation():
    a, b = pair()
    out = a.handle(addr(9), 9, 1009, wire.GOSSIP,
                   {"b": [{"k": "s", "id": 2, "boot": 1002, "n": 0, "by": 9}]}, 1.0)
    assert a.members.nodes[2].state == SUSPECT and kinds(a) == ["suspect"]
    # 1's next datagram to 2 tells it so ("you"), and 2 refutes
    msg = a.message(addr(2), wire.GOSSIP, {}, 1.1, a.members.nodes[2])
    assert msg.body["you"] == {"s": "suspect", "n": 0}
    b.handle(addr(1), 1, 1001, wire.GOSSIP, msg.body, 1.1)
    assert b.members.incarnation == 1 and b.awareness.score == 1
    [refute] = b.queue.take(10_000, 99)
    assert refute == {"k": "r", "id": 2, "boot": 1002, "n": 1}  # compact: no entry
    a.handle(addr(2), 2, 1002, wire.GOSSIP, {"b": [refute]}, 1.2)
    assert a.members.nodes[2].state == ALIVE and a.members.nodes[2].incarnation == 1
    assert kinds(a) == ["alive"] and a.suspicions == {}
    assert a.queue.pending(2) == refute  # passed on as it came
    # the old suspicion, heard again late, no longer counts
    a.handle(addr(9), 9, 1009, wire.GOSSIP,
             {"b": [{"k": "s", "id": 2, "boot": 1002, "n": 0, "by": 9}]}, 1.3)
    assert a.members.nodes[2].state == ALIVE
    assert out == []


def suspected_and_refuted(reader_pr: int | None) -> tuple[Swim, Swim]:
    """1 suspects 2, and 2 refutes; node 3 is known to both, of protocol revision
    ``reader_pr`` (None: an entry without it, as a daemon of revision 0 sends)."""
    a, b = pair()
    three = wire_entry(3, boot=1003, addr=addr(3)[0])
    if reader_pr is not None:
        three["pr"] = reader_pr
    for s in (a, b):
        s.members.merge(three, 0.5, "key")
        s.take_events()
    a.handle(addr(9), 9, 1009, wire.GOSSIP,
             {"b": [{"k": "s", "id": 2, "boot": 1002, "n": 0, "by": 9}]}, 1.0)
    msg = a.message(addr(2), wire.GOSSIP, {}, 1.1, a.members.nodes[2])
    b.handle(addr(1), 1, 1001, wire.GOSSIP, msg.body, 1.1)
    return a, b


def changes_to(s: Swim, nid: int, now: float) -> list[dict[str, Any]]:
    msg = s.message(addr(nid), wire.GOSSIP, {}, now, s.members.nodes[nid], own=False)
    return msg.body.get("b", [])


@pytest.mark.parametrize("reader_pr", [None, 0])
def test_a_node_of_revision_0_hears_a_refutation_as_the_whole_entry(reader_pr):
    """A daemon of protocol revision 0 (2a0) drops a datagram with a record kind it does
    not know: the compact refutation goes to it as the refuter's entry, from the refuter
    and from a node passing the refutation on."""
    a, b = suspected_and_refuted(reader_pr)
    [whole] = changes_to(b, 3, 1.2)
    assert whole["k"] == "a" and whole["e"]["id"] == 2 and whole["e"]["n"] == 1
    assert wire.check_entry(whole["e"]) and whole["e"]["pr"] == 1
    assert changes_to(b, 1, 1.2) == [{"k": "r", "id": 2, "boot": 1002, "n": 1}]
    a.handle(addr(2), 2, 1002, wire.GOSSIP, {"b": [b.queue.pending(2)]}, 1.3)
    assert a.members.nodes[2].state == ALIVE
    [passed] = changes_to(a, 3, 1.4)
    assert passed["k"] == "a" and passed["e"]["id"] == 2 and passed["e"]["n"] == 1
    assert passed["e"]["age"] >= 0 and passed["e"]["name"] == "n2"


def test_a_node_of_revision_1_hears_the_compact_refutation():
    a, b = suspected_and_refuted(1)
    compact = {"k": "r", "id": 2, "boot": 1002, "n": 1}
    assert changes_to(b, 3, 1.2) == [compact]
    assert changes_to(b, 1, 1.2) == [compact]
    # our own refutation is not sent back to us
    a.handle(addr(2), 2, 1002, wire.GOSSIP, {"b": [compact]}, 1.3)
    assert changes_to(a, 2, 1.4) == []


def test_a_compact_refutation_applies_only_to_the_node_it_names():
    a, _ = pair()
    a.handle(addr(9), 9, 1009, wire.GOSSIP,
             {"b": [{"k": "s", "id": 2, "boot": 1002, "n": 3, "by": 9}]}, 1.0)
    a.take_events()
    for stale in ({"k": "r", "id": 2, "boot": 1002, "n": 3},  # not above the suspicion's
                  {"k": "r", "id": 2, "boot": 999, "n": 9},  # another boot of node 2
                  {"k": "r", "id": 77, "boot": 1, "n": 9}):  # a node we do not know
        a.handle(addr(9), 9, 1009, wire.GOSSIP, {"b": [stale]}, 1.1)
    assert a.members.nodes[2].state == SUSPECT and a.members.nodes[2].incarnation == 3
    assert 77 not in a.members.nodes and kinds(a) == []
    assert a.queue.pending(2)["k"] == "s"
    # about ourselves: refuted by us, not taken from others
    a.handle(addr(9), 9, 1009, wire.GOSSIP, {"b": [{"k": "r", "id": 1, "boot": 1001,
                                                      "n": 50}]}, 1.2)
    assert a.members.incarnation == 0 and kinds(a) == []


def test_a_refutation_does_not_replace_news_of_our_flags_still_going_out():
    """Our flags changed (news: our whole entry, queued) and we are accused before it has
    gone out as often as it must: the refutation goes whole too, with the flags."""
    a, b = pair()
    b.members.set_flag("blocked", True)
    b.tick(0.1)
    assert b.queue.pending(2)["k"] == "a"
    a.handle(addr(9), 9, 1009, wire.GOSSIP,
             {"b": [{"k": "s", "id": 2, "boot": 1002, "n": 1, "by": 9}]}, 0.2)
    msg = a.message(addr(2), wire.GOSSIP, {}, 0.3, a.members.nodes[2])
    b.handle(addr(1), 1, 1001, wire.GOSSIP, msg.body, 0.3)
    news = b.queue.pending(2)
    assert news["k"] == "a" and news["e"]["n"] == 2 and news["e"]["flags"] == ["blocked"]
    # passed on whole by a node it revives (not as a compact refutation)
    a.handle(addr(2), 2, 1002, wire.GOSSIP, {"b": [news]}, 0.4)
    assert a.members.nodes[2].state == ALIVE and a.queue.pending(2)["k"] == "a"


def test_a_node_revived_by_a_compact_refutation_is_probed_this_round():
    a, _ = pair()
    for i in (3, 4, 5):
        a.members.merge({**wire_entry(i, boot=1000 + i), "age": 0}, 0.0, "key")
    a.members.dead(3, 0, 0.5, "test")
    a.order, a.in_order, a.pos = [4, 5, 2], {4, 5, 2}, 1  # this round, without node 3
    a.handle(addr(4), 4, 1004, wire.GOSSIP, {"b": [{"k": "r", "id": 3, "boot": 1003,
                                                      "n": 1}]}, 1.0)
    assert a.members.nodes[3].state == ALIVE
    assert 3 in a.order[a.pos:]


def test_a_node_back_from_the_dead_is_passed_on_whole():
    """A death is rare (a partition healed, a long stall) and some nodes may have forgotten
    the dead node since (forget_after): its refutation goes whole, from the node itself
    and from a node it revives, so that a node that forgot it takes it back."""
    a, b = pair()
    c = make(3)
    b.handle(addr(1), 1, 1001, wire.GOSSIP, {"you": {"s": "dead", "n": 0}}, 1.0)
    whole = b.queue.pending(2)
    assert whole["k"] == "a" and whole["e"]["n"] == 1
    # a held 2 dead and hears the compact form (from a node that had it suspect only)
    a.members.dead(2, 0, 0.5, "test")
    a.take_events()
    a.handle(addr(9), 9, 1009, wire.GOSSIP, {"b": [{"k": "r", "id": 2, "boot": 1002,
                                                      "n": 1}]}, 1.1)
    assert kinds(a) == ["alive"]
    passed = a.queue.pending(2)
    assert passed["k"] == "a" and passed["e"]["id"] == 2 and passed["e"]["n"] == 1
    c.handle(addr(1), 1, 1001, wire.GOSSIP, {"b": [passed]}, 1.2)  # c had forgotten it
    assert c.members.nodes[2].state == ALIVE and c.members.nodes[2].incarnation == 1


def test_a_node_that_finds_itself_dead_in_a_page_refutes_whole():
    """After a partition heals, a push-pull page may be the first to tell a node it is
    held dead (the page is merged before the datagram's "you")."""
    _a, b = pair()
    page = [{"e": {**b.members.own_entry(), "age": 10}, "sw": "d"}]
    b.handle(addr(1), 1, 1001, wire.SYNC, {"page": page, "you": {"s": "dead", "n": 0}}, 1.0)
    whole = b.queue.pending(2)
    assert whole["k"] == "a" and whole["e"]["n"] == 1


def test_a_whole_refutation_without_news_is_passed_on_compact():
    """A refutation that came whole (from a node of revision 0, or through one) but says
    nothing new of the node but that it is alive goes on compact: passed on whole by
    every node, it cost what compact refutations save."""
    a, b = pair()
    a.handle(addr(9), 9, 1009, wire.GOSSIP,
             {"b": [{"k": "s", "id": 2, "boot": 1002, "n": 0, "by": 9}]}, 1.0)
    a.queue = TransmitQueue()
    whole = {"k": "a", "e": {**b.members.own_entry(), "n": 1, "hb": 5}}
    a.handle(addr(9), 9, 1009, wire.GOSSIP, {"b": [whole]}, 1.1)
    assert a.members.nodes[2].state == ALIVE
    assert a.queue.pending(2) == {"k": "r", "id": 2, "boot": 1002, "n": 1}


def test_relayed_acks_and_nacks_carry_compact_refutations_to_a_node_that_reads_them():
    _a, b = pair()
    b.members.merge({**wire_entry(3, boot=1003, addr=addr(3)[0]), "pr": 1}, 0.0, "key")
    for seq in (5, 6):  # 1 asks 2 to ping 3, twice: one ack comes, one does not
        b.handle(addr(1), 1, 1001, wire.PING_REQ,
                 {"seq": seq, "to": 3, "addr": list(addr(3))}, 1.0)
    compact = {"k": "r", "id": 7, "boot": 1, "n": 1}  # of a node 2 does not know
    b.queue = TransmitQueue()
    b.queue.push(7, compact)
    [acked, _] = sorted(b.relays)
    [ack] = b.handle(addr(3), 3, 1003, wire.ACK, {"seq": acked}, 1.05)
    assert ack.dest == addr(1) and ack.body["seq"] == 5 and ack.body["b"] == [compact]
    nack_at = b.relays[max(b.relays)].nack_at
    [nack] = [o for o in b.tick(nack_at) if o.mtype == wire.NACK]
    assert nack.dest == addr(1) and nack.body["seq"] == 6 and nack.body["b"] == [compact]


def test_a_stale_compact_refutation_is_dropped_not_kept_for_ever():
    """A refutation of a node we no longer know at that boot (it restarted) cannot be
    sent whole to a node of revision 0: it leaves the queue."""
    a, _ = pair()
    a.queue = TransmitQueue()  # the news of the join sent
    a.queue.push(7, {"k": "r", "id": 7, "boot": 1, "n": 1})
    assert a.queue.take(10_000, 99, form=lambda r: a._whole(r, 1.0)) == []
    assert len(a.queue) == 0


def test_a_node_stalled_for_two_seconds_is_not_declared_dead():
    net = Net(8)
    net.start()
    net.run(4.0)
    for s in net.nodes.values():
        s.take_events()
    net.down.add(5)
    net.run(6.0)
    net.down.discard(5)  # it wakes up and hears it is suspect
    net.run(20.0)
    assert all(net.state(i, 5) == ALIVE for i in net.nodes if i != 5)
    assert all("dead" not in kinds(s) for s in net.nodes.values())
    assert net.nodes[5].members.incarnation >= 1


# ---------------------------------------------------------------------- Lifeguard


def test_suspicion_timeout_starts_long_and_shrinks_with_confirmations():
    lo, hi = suspicion_bounds(1000, 4, 6, 0.5)
    assert lo == pytest.approx(4 * 3 * 0.5) and hi == pytest.approx(6 * lo)
    assert suspicion_bounds(5, 4, 6, 0.5)[0] == pytest.approx(4 * 1 * 0.5)  # log floor 1
    k = confirmations_wanted(1000, 4)
    assert k == 2 and confirmations_wanted(3, 4) == 0
    s = Suspicion(10.0, lo, hi, k, {7})
    assert s.deadline == pytest.approx(10.0 + hi)
    assert s.confirm(8) and not s.confirm(8)
    one = s.timeout()
    assert lo < one < hi
    assert s.confirm(9)
    assert s.timeout() == pytest.approx(lo)
    assert not s.confirm(10)  # k reached: more accusers change nothing
    assert Suspicion(0.0, lo, hi, 0, {1}).timeout() == lo


def test_confirmations_bring_death_forward_in_a_node():
    a, _ = pair()
    for i in (3, 4, 5, 6):
        a.members.merge({**wire_entry(i, boot=1000 + i), "age": 0}, 0.0, "key")
    accuse = {"k": "s", "id": 3, "boot": 1003, "n": 0}
    while a.next_due() < 1.0:  # a runs, as its driver would have it
        a.tick(a.next_due())
    a.handle(addr(4), 4, 1004, wire.GOSSIP, {"b": [{**accuse, "by": 4}]}, 1.0)
    first = a.suspicions[3].deadline
    a.handle(addr(5), 5, 1005, wire.GOSSIP, {"b": [{**accuse, "by": 5}]}, 1.1)
    a.handle(addr(6), 6, 1006, wire.GOSSIP, {"b": [{**accuse, "by": 6}]}, 1.2)
    assert a.suspicions[3].deadline < first
    # each new confirmation is passed on (others count it too); a repeated one is not
    assert a.queue.pending(3)["by"] == 6
    deadline = a.suspicions[3].deadline
    while a.next_due() <= deadline:
        a.tick(max(1.2, a.next_due()))
    assert a.members.nodes[3].state == DEAD


def test_missed_acks_and_nacks_stretch_our_own_timeouts():
    aw = Awareness(8)
    aw.apply(3)
    assert aw.scale(0.5) == pytest.approx(2.0)
    aw.apply(100)
    assert aw.score == 7
    aw.apply(-100)
    assert aw.score == 0
    # a node whose helpers send no nack (it hears nothing: it is the slow one)
    net = Net(4)
    net.start()
    net.run(3.0)
    slow = net.nodes[1]
    net.cut = {(j, 1) for j in (2, 3, 4)}  # 1 hears nobody: no acks, no nacks
    net.run(5.0)
    assert slow.awareness.score >= 2
    t = net.now
    slow.probe = None
    slow.next_probe = t
    slow.tick(t)
    p = slow.probe
    scale = slow.awareness.score + 1
    assert p.timeout_at - p.start == pytest.approx(scale * slow.params.probe_timeout)
    assert p.end_at - p.start == pytest.approx(scale * slow.params.probe_interval)
    net.cut = set()
    net.run(t + 30)
    assert slow.awareness.score == 0  # acks bring it back down


def formed(n: int) -> Net:
    """A net of ``n`` nodes that have known each other for 3 s; its events so far taken."""
    net = Net(n)
    net.start()
    net.run(3.0)
    for s in net.nodes.values():
        s.take_events()
    return net


def test_a_node_that_hears_from_no_helper_accuses_nobody():
    """No ack, and not one helper saying "no answer from it either": the silence is our
    host's (stalled by a loaded machine, its socket unread), not evidence against the
    target.  Such a node stretches its timeouts and accuses nobody; 100 daemons on one
    machine suspected each other after every stall of it.  A node whose helpers do say
    nack suspects the silent target at once (test_helper_says_nack_...)."""
    net = formed(4)
    slow = net.nodes[1]
    net.cut = {(j, 1) for j in (2, 3, 4)}  # 1 hears nobody: no acks, no nacks
    net.run(8.0)
    assert slow.awareness.score >= 2
    assert "suspect" not in kinds(slow)
    assert all(slow.members.nodes[j].state == ALIVE for j in (2, 3, 4))
    assert all(net.state(j, 1) != ALIVE for j in (2, 3, 4))  # it is silent to them


# ---------------------------------------------------------------------- dissemination


def test_a_change_is_sent_a_limited_number_of_times_newest_and_least_sent_first():
    q = TransmitQueue()
    q.push(3, {"k": "s", "id": 3, "boot": 1, "n": 0, "by": 2})
    q.push(4, {"k": "d", "id": 4, "boot": 1, "n": 0, "by": 2})
    assert [r["id"] for r in q.take(10_000, 3)] == [4, 3]  # the newest first
    q.push(5, {"k": "d", "id": 5, "boot": 1, "n": 0, "by": 2})
    assert [r["id"] for r in q.take(60, 3)] == [5]  # least sent first, within the budget
    assert len(q.take(10_000, 3)) == 3 and len(q) == 3  # each sent twice now
    assert len(q.take(10_000, 3)) == 3 and len(q) == 0  # and three times: done
    assert q.take(10_000, 3) == []
    # a newer change about a node replaces the one still queued
    q.push(3, {"k": "s", "id": 3, "boot": 1, "n": 0, "by": 2})
    q.push(3, {"k": "d", "id": 3, "boot": 1, "n": 0, "by": 2})
    assert q.take(10_000, 3) == [{"k": "d", "id": 3, "boot": 1, "n": 0, "by": 2}]
    assert retransmit_limit(4, 1000) == 16 and retransmit_limit(4, 9) == 4


def test_piggybacked_changes_stop_after_the_retransmit_limit():
    a, _b = pair()
    a.handle(addr(9), 9, 1009, wire.GOSSIP,
             {"b": [{"k": "s", "id": 2, "boot": 1002, "n": 0, "by": 9}]}, 1.0)
    carried = 0
    for i in range(40):
        msg = a.message(addr(2), wire.PING, {"seq": i, "to": 2}, 1.0 + i * 0.01,
                        a.members.nodes[2])
        carried += "b" in msg.body
    assert carried == a.limit() == retransmit_limit(a.params.retransmit_mult, a.size())
    assert a.queue.take(10_000, 99) == []


def test_join_spreads_to_every_node_and_every_datagram_fits():
    net = Net(30)
    net.start()
    net.run(8.0)
    assert all(len(s.members.live_nodes()) == 29 for s in net.nodes.values())
    assert net.largest <= wire.MAX_DATAGRAM
    # a newcomer, through one seed only
    new = make(31)
    net.nodes[31] = new
    net.by_addr[addr(31)] = 31
    t0 = net.now
    net.send(31, new.start(net.now, [addr(7)]))
    net.run(t0 + 3.0)
    assert all(net.state(i, 31) == ALIVE for i in range(1, 31))
    assert len(new.members.live_nodes()) == 30


# ---------------------------------------------------------------------- push-pull


def test_push_pull_merges_what_either_side_lacks():
    a, b = pair()
    for i in (10, 11):
        a.members.merge({**wire_entry(i, boot=1000 + i), "age": 0}, 0.0, "key")
    for i in (20, 21):
        b.members.merge({**wire_entry(i, boot=1000 + i), "age": 0}, 0.0, "key")
    a.members.merge({**wire_entry(20, boot=1020), "age": 0}, 0.0, "key")
    b.members.dead(20, 0, 0.0, "test")
    req = a.sync.request(a.members.nodes[2], 1.0)
    assert req.mtype == wire.PUSH_PULL and req.body["dig"]
    [reply] = b.handle(addr(1), 1, 1001, wire.PUSH_PULL, req.body, 1.0)
    assert reply.mtype == wire.SYNC
    # b sent what a lacks; a sends back what b lacks
    out = a.handle(addr(2), 2, 1002, wire.SYNC, reply.body, 1.1)
    assert {20, 21} <= set(a.members.nodes)
    assert a.members.nodes[20].state == SUSPECT  # dead elsewhere: suspect here, never dead
    [last] = body_of(out, wire.SYNC)
    b.handle(addr(1), 1, 1001, wire.SYNC, last.body, 1.2)
    assert {10, 11} <= set(b.members.nodes)


def test_push_pull_is_bounded_however_large_the_table():
    a, b = pair()
    for i in range(100, 2100):
        a.members.merge({**wire_entry(i, boot=i, addr=addr(i)[0]), "age": 0}, 0.0, "key")
    sizes = []
    for _ in range(5):
        req = a.sync.request(a.members.nodes[2], 1.0)
        sizes.append(len(json.dumps(req.body, separators=(",", ":"))) + OVERHEAD)
        for o in b.handle(addr(1), 1, 1001, wire.PUSH_PULL, req.body, 1.0):
            sizes.append(len(json.dumps(o.body, separators=(",", ":"))) + OVERHEAD)
    assert max(sizes) <= wire.MAX_DATAGRAM
    assert a.sync.cursor > 100  # the slice rotates


def test_idle_traffic_per_node_does_not_grow_with_the_cluster():
    rates = []
    for n in (8, 40):
        net = Net(n)
        net.start()
        net.run(15.0)
        net.sent.clear()
        net.run(35.0)
        rates.append(sum(net.sent.values()) / n / 20.0)
    assert max(rates) < 4096
    assert rates[1] < 1.5 * rates[0]


def test_rejoin_after_a_partition_heals():
    net = Net(6, SwimParams(rejoin_interval=5.0))
    net.start()
    net.run(4.0)
    left, right = {1, 2, 3}, {4, 5, 6}
    net.partition(left, right)
    net.run(30.0)
    assert all(net.state(i, j) == DEAD for i in left for j in right)
    assert all(net.state(i, j) == DEAD for i in right for j in left)
    net.cut = set()
    net.run(60.0)
    assert all(net.state(i, j) == ALIVE for i in net.nodes for j in net.nodes if i != j)


def test_an_isolated_node_retries_its_seeds_with_backoff():
    s = make(3)
    s.broadcast = ("10.0.255.255", 4270)
    outs = s.start(0.0, [addr(1)])
    assert {(o.dest, o.body["reply"]) for o in outs} == {(addr(1), True),
                                                          (s.broadcast, False)}
    times = []
    t = 0.0
    while t < 60:
        t = s.next_due()
        if body_of(s.tick(t), wire.HELLO):
            times.append(t)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) >= 4 and gaps[-1] > gaps[0]
    assert max(gaps) <= 1.5 * s.params.rejoin_interval
    s.members.set_flag("quiet", True)  # a quiet node does not broadcast
    assert all(o.dest != s.broadcast for o in s.sync._hellos(t))


# ---------------------------------------------------------------------- robustness


@pytest.mark.parametrize("body", [
    {"seq": -1, "to": 1}, {"seq": "1", "to": 1}, {"seq": 1}, {"seq": 1, "to": 1, "b": "x"},
    {"seq": 1, "to": 1, "b": [{"k": "s", "id": 0, "boot": 1, "n": 0, "by": 2}]},
    {"seq": 1, "to": 1, "b": [{"k": "z"}]}, {"seq": 1, "to": 1, "you": {"s": "alive"}},
    {"seq": 1, "to": 1, "b": [{"k": "r", "id": 2, "boot": 1002}]},
    {"seq": 1, "to": 1, "b": [{"k": "r", "id": 2, "boot": 1002, "n": -1}]},
    {"seq": 1, "to": 1, "b": [{"k": "r", "id": 2, "boot": "1002", "n": 1}]},
    {"seq": 1, "to": 1, "me": {**wire_entry(2, boot=1002), "age": 0, "pr": "1"}},
    {"seq": 1, "to": 1, "me": {**wire_entry(2, boot=1002), "age": 0, "pr": -1}},
    {"seq": 1, "to": 1, "e": [{"id": 5}]}, {"seq": 1, "to": 1, "b": [{}] * 65},
    {"seq": 1, "to": 1, "me": {**wire_entry(3, boot=1003), "age": 0}},
])
def test_malformed_bodies_raise_and_change_nothing(body):
    a, _ = pair()
    before = (dict(a.members.nodes), a.members.incarnation, len(a.queue))
    with pytest.raises(wire.WireError):
        a.handle(addr(2), 2, 1002, wire.PING, body, 1.0)
    assert (dict(a.members.nodes), a.members.incarnation, len(a.queue)) == before


def test_leave_is_announced_and_spread():
    a, b = pair()
    [bye] = [o for o in b.leave(1.0) if o.dest == addr(1)]
    a.handle(addr(2), 2, 1002, bye.mtype, bye.body, 1.0)
    assert 2 not in a.members.nodes and kinds(a)[-1] == "leave"
    assert a.queue.pending(2)["k"] == "l"


def test_time_a_node_was_stopped_is_no_evidence_against_others():
    """A node stopped (SIGSTOP, a CPU hog) past its deadlines does not, on waking,
    declare dead a member whose refutation still waits unread in its socket, nor suspect
    the member it was probing; it counts itself as the slow one instead."""
    a, _ = pair()
    for i in (3, 4):
        a.members.merge({**wire_entry(i, boot=1000 + i), "age": 0}, 0.0, "key")
    while a.next_due() < 1.0:
        a.tick(a.next_due())
    a.handle(addr(4), 4, 1004, wire.GOSSIP,
             {"b": [{"k": "s", "id": 3, "boot": 1003, "n": 0, "by": 4}]}, 1.0)
    while a.probe is None:
        a.tick(a.next_due())
    probed = a.probe.target
    late = a.suspicions[3].deadline + 5.0  # stopped through the whole suspicion
    a.tick(late)
    assert a.members.nodes[3].state == SUSPECT and a.members.nodes[probed].state != DEAD
    assert a.awareness.score >= 1
    a.handle(addr(3), 3, 1003, wire.GOSSIP,
             {"b": [{"k": "a", "e": {**wire_entry(3, boot=1003, n=1), "age": 0}}]}, late)
    assert a.members.nodes[3].state == ALIVE
    # a suspicion left unrefuted still ends: only the stopped time was added
    b, _ = pair()
    b.members.merge({**wire_entry(3, boot=1003), "age": 0}, 0.0, "key")
    b.members.merge({**wire_entry(4, boot=1004), "age": 0}, 0.0, "key")
    while b.next_due() < 1.0:
        b.tick(b.next_due())
    b.handle(addr(4), 4, 1004, wire.GOSSIP,
             {"b": [{"k": "s", "id": 3, "boot": 1003, "n": 0, "by": 4}]}, 1.0)
    b.tick(b.suspicions[3].deadline + 5.0)
    while b.members.nodes[3].state == SUSPECT:
        b.tick(b.next_due())
    assert b.members.nodes[3].state == DEAD


def test_an_idle_pair_wakes_only_for_its_probes():
    """Two idle nodes: the change about the one member a node knows can go to nobody
    else, so it must not wake the node every gossip_interval (bench_idle measured the
    daemon at 7 ticks a second instead of about 2, one per probe period)."""
    net = Net(2)
    ticks = {i: 0 for i in net.nodes}
    for i, s in net.nodes.items():
        def counted(now: float, i: int = i, tick: Any = s.tick) -> list[Outgoing]:
            ticks[i] += 1
            return tick(now)
        s.tick = counted  # type: ignore[method-assign]
    net.start()
    net.run(10.0)
    ticks = dict.fromkeys(ticks, 0)
    net.run(70.0)
    per_period = SwimParams().probe_interval
    for i, n in ticks.items():
        assert n / 60.0 <= 1.2 / per_period, (i, n / 60.0)
    assert all(s.awareness.score == 0 for s in net.nodes.values())
    # a new member wakes the gossip again: the change goes to it
    n3 = make(3)
    net.nodes[3], net.by_addr[addr(3)] = n3, 3
    net.send(3, n3.start(net.now, [addr(1)]))
    net.run(net.now + 3.0)
    assert all(net.state(3, j) == ALIVE for j in (1, 2))


def test_a_change_in_a_quiet_cluster_is_no_sign_of_our_own_slowness():
    """A change arriving while the queue was empty is due at once, not at the time of
    the last gossip long ago: taken for the time the next tick was expected, it made the
    node count itself slow (Lifeguard's awareness) at every change in a quiet cluster,
    stretching its probe periods (a crash was suspected after 1.5 s instead of 0.5-1)."""
    a, b = pair()
    a.queue, b.queue = TransmitQueue(), TransmitQueue()  # the news of the join sent
    t = 0.0
    while t < 5.0:  # quiet: probes and acks only
        t = a.next_due()
        for o in a.tick(t):
            for back in b.handle(addr(1), 1, 1001, o.mtype, o.body, t + 0.001):
                a.handle(addr(2), 2, 1002, back.mtype, back.body, t + 0.002)
    assert a.awareness.score == 0 and not a.queue
    # node 3 joins through a: its HELLO is news to pass on
    hello = make(3).start(t + 0.01, [addr(1)])[0]
    a.handle(addr(3), 3, 1003, hello.mtype, hello.body, t + 0.01)
    assert a.next_due() <= t + 0.01  # due at once: the driver ticks now
    a.tick(t + 0.011)
    assert a.awareness.score == 0


def test_a_node_cut_off_from_every_other_one_still_sees_them_go():
    """The silence of every helper accuses nobody only while our timeouts can still
    stretch: once they are stretched all they can be, a node that hears nobody (its
    cable pulled) suspects, and in the end buries, the others, as they bury it."""
    net = formed(4)
    alone = net.nodes[1]
    net.cut = {(a, b) for a in range(1, 5) for b in range(1, 5) if 1 in (a, b) and a != b}
    net.run(120.0)
    assert alone.awareness.at_max
    assert "suspect" in kinds(alone)
    assert all(alone.members.nodes[j].state != ALIVE for j in (2, 3, 4))
