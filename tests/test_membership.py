import pytest

from omuscd.cluster.membership import ALIVE, DEAD, SUSPECT, IdClash, Membership, Timing
from tests.fakes import wire_entry as entry


def me(nid=1, inc=10, boot=100):
    return {**entry(nid, inc=inc, boot=boot, hb=0, addr="198.18.0.1")}


def kinds(events):
    return [e.kind for e in events]


def table(**kw):
    return Membership(me(**kw), Timing(100.0))


def test_join_then_figures_age_but_silence_alone_judges_nothing():
    """Liveness is SWIM's (tests/test_swim.py); the table only ages the figures: a node
    whose figures are old stays alive, and ``nodes`` shows how old they are."""
    m = table()
    assert kinds(m.merge(entry(5, age=1000), 50.0, "key")) == ["join"]
    # the figures were produced 1 s before we heard them: their age counts from then
    assert m.nodes[5].view(53.0)["last_heard"] == 4.0 == m.nodes[5].view(53.0)["age"]
    ev, _ = m.sweep(500.0)
    assert ev == [] and m.nodes[5].state == ALIVE


def test_suspect_and_dead_at_an_incarnation_only_a_higher_one_revives():
    m = table()
    m.merge(entry(5, hb=1), 0.0, "key")
    assert kinds(m.suspect(5, 0, 1.0, "no ack")) == ["suspect"]
    assert m.nodes[5].state == SUSPECT and m.suspect(5, 0, 1.1, "again") == []
    assert kinds(m.dead(5, 0, 2.0, "not refuted")) == ["dead"]
    # fresher figures at the same incarnation revive nothing
    assert m.merge(entry(5, hb=2, n=0), 3.0, "key") == []
    assert m.nodes[5].state == DEAD and m.nodes[5].entry["hb"] == 2
    assert kinds(m.merge(entry(5, hb=3, n=1), 4.0, "key")) == ["alive"]
    assert m.nodes[5].state == ALIVE and m.nodes[5].incarnation == 1
    # a suspicion of an older incarnation is refuted already
    assert m.suspect(5, 0, 5.0, "late news") == [] and m.nodes[5].state == ALIVE


def test_old_news_does_not_go_back():
    m = table()
    m.merge(entry(5, hb=9, load=0.9), 0.0, "key")
    m.merge(entry(5, hb=10, age=6500, load=0.7), 7.1, "key")
    m.merge(entry(5, hb=3, load=0.1), 7.2, "key")
    assert m.nodes[5].entry["hb"] == 10 and m.nodes[5].entry["load"] == 0.7


def test_departure_is_immediate_and_stale_gossip_does_not_resurrect():
    m = table()
    m.merge(entry(5, hb=4), 0.0, "key")
    assert kinds(m.merge(entry(5, hb=5, st="left"), 1.0, "key")) == ["leave"]
    assert 5 not in m.nodes
    assert m.merge(entry(5, hb=4), 1.1, "key") == []  # a third party's old news
    assert 5 not in m.nodes
    assert kinds(m.merge(entry(5, boot=999, inc=50, hb=0), 2.0, "key")) == ["join"]


def test_restart_replaces_the_older_incarnation_only():
    m = table()
    m.merge(entry(5, inc=1, boot=7), 0.0, "key")
    assert kinds(m.merge(entry(5, inc=2, boot=8), 0.1, "key")) == ["restart"]
    assert m.merge(entry(5, inc=1, boot=7, hb=99), 0.2, "key") == []
    assert m.nodes[5].entry["boot"] == 8


def test_forgets_dead_nodes_after_forget_after():
    m = table()
    m.merge(entry(5), 0.0, "key")
    m.dead(5, 0, 6.0, "test")
    ev, nxt = m.sweep(7.0)
    assert ev == [] and nxt == pytest.approx(106.0)
    ev, _ = m.sweep(106.0)
    assert kinds(ev) == ["forget"] and not m.nodes


def test_own_echo_is_ignored():
    m = table(nid=5, boot=77)
    assert m.merge(entry(5, boot=77), 0.0, "key") == []
    assert not m.nodes


def test_id_clash_the_later_node_moves():
    later = table(nid=5, inc=20, boot=1)
    ev = later.merge(entry(5, inc=10, boot=2, name="early"), 0.0, "key")
    assert kinds(ev) == ["clash"] and later.my_id != 5 and later.my_id >= 65536
    assert "early" in ev[0].text
    earlier = table(nid=5, inc=10, boot=2)
    ev = earlier.merge(entry(5, inc=20, boot=1), 0.0, "key")
    assert kinds(ev) == ["clash"] and earlier.my_id == 5
    assert earlier.merge(entry(5, inc=20, boot=1, hb=9), 0.1, "key") == []  # said once


def test_id_clash_with_an_explicit_id_refuses():
    m = Membership(me(nid=5, inc=20, boot=1), id_explicit=True)
    with pytest.raises(IdClash, match="--node-id"):
        m.merge(entry(5, inc=10, boot=2), 0.0, "key")


def test_entries_are_sent_with_the_age_of_their_figures():
    m = table()
    for i in range(2, 12):
        m.merge(entry(i, age=i * 100), 10.0, "key")
    assert m.own_entry()["age"] == 0
    assert m.aged(m.nodes[2], 10.5)["age"] == 700
    assert len(m.live_nodes()) == 10


def test_incompatible_nodes_are_listed_apart():
    m = table()
    ev = m.note_incompatible(("198.18.0.9", 4270), 9, 2, {"entry": {"name": "new"}}, 0.0, "key")
    assert kinds(ev) == ["incompatible"]
    assert m.counts()["incompatible"] == 1 and 9 not in m.nodes
    assert m.incompatible[("198.18.0.9", 4270)].view(1.0)["state"] == "incompatible"


def test_find_by_id_or_name():
    m = table()
    m.merge(entry(5, name="a"), 0.0, "key")
    m.merge(entry(6, name="a"), 0.0, "key")
    m.merge(entry(7, name="b"), 0.0, "key")
    assert m.find("7").name == "b" and m.find("b").id == 7
    with pytest.raises(ValueError, match="ambiguous"):
        m.find("a")
    assert m.find("zz") is None


def test_our_previous_life_in_gossip_is_no_clash():
    """A daemon restarted on the same address hears others' news of its old self."""
    m = table(nid=5, inc=20, boot=1)
    assert m.merge(entry(5, inc=10, boot=2, addr="198.18.0.1"), 0.0, "key") == []
    assert m.merge(entry(5, inc=10, boot=3, addr="198.18.0.9", st="left"), 0.0, "key") == []
    assert m.my_id == 5
    # the same id elsewhere is still a clash
    assert kinds(m.merge(entry(5, inc=10, boot=4, addr="198.18.0.9"), 0.0, "key")) == ["clash"]


# ---------------------------------------------------------------------- this node's flags


def test_this_nodes_flags_are_set_through_membership_and_gossiped_sorted():
    m = table()
    m.set_flag("quiet", True)
    m.set_flag("criu", True)
    m.set_flag("criu", True)  # twice is once
    assert m.own_entry()["flags"] == ["criu", "quiet"] and m.has_flag("quiet")
    m.set_flag("quiet", False)
    m.set_flag("blocked", False)  # lowering a flag that is not raised changes nothing
    assert m.own_entry()["flags"] == ["criu"] and not m.has_flag("quiet")
    m.set_role("controller")
    assert m.own_entry()["role"] == "controller"


# ---------------------------------------------------------------------- the UDP half


KEY = b"k" * 32


class _Sent:
    """Datagrams the gossip layer sent, kept instead of sent (its socket's sendto)."""

    def __init__(self) -> None:
        self.out: list[tuple[bytes, tuple[str, int]]] = []

    def sendto(self, data: bytes, dest: tuple[str, int]) -> int:
        self.out.append((data, dest))
        return len(data)


def _gossip(security: str = "key"):
    """Node 1 (the one under test) and a codec for node 6 talking to it."""
    from omuscd import wire
    from omuscd.cluster.gossip import Gossip
    from tests.fakes import fake_cfg

    cfg = fake_cfg(address="198.18.0.1", port=4270, broadcast=None, peers=[],
                   balance_threshold=0.5)
    g = Gossip(cfg, wire.Codec(KEY, 1, 100, 10), table(), security)
    g.raw = _Sent()  # type: ignore[assignment]
    return g, wire.Codec(KEY, 6, 88, 2)


SIX = ("198.18.0.6", 4270)


def _hello(codec, wall: float) -> bytes:
    from omuscd import wire

    return codec.encode(wire.HELLO, {"entry": entry(6, boot=88, inc=2), "reply": False}, wall)


def test_topology_datagrams_reach_their_handler_only_from_known_nodes():
    """REQUEST and OFFER belong to the balancer; the gossip layer hands them to whoever
    registered for them, and only from a node it knows (never on a read-only node).  A
    handler's WireError is counted as a drop; nothing raises out of the receive path."""
    import time

    from omuscd import wire

    g, six = _gossip()
    got = []
    g.handlers[wire.REQUEST] = lambda body, src, sender: got.append((body, src, sender))
    wall = time.time()
    g.handle_datagram(six.encode(wire.REQUEST, {"rid": 1}, wall), SIX, 5.0, wall)
    assert got == [] and g.counters["in"] == 1  # node 6 is not known yet
    g.handle_datagram(_hello(six, wall), SIX, 5.0, wall)
    assert 6 in g.members.nodes
    g.handle_datagram(six.encode(wire.REQUEST, {"rid": 2}, wall), SIX, 5.1, wall)
    assert got == [({"rid": 2}, SIX, 6)]

    def malformed(body, src, sender):
        raise wire.WireError("malformed", "bad balancing request")

    g.handlers[wire.REQUEST] = malformed
    before = g.counters["malformed"]
    g.handle_datagram(six.encode(wire.REQUEST, {"rid": "x"}, wall), SIX, 5.2, wall)
    assert g.counters["malformed"] == before + 1

    ro, six = _gossip("read-only")
    ro.handlers[wire.REQUEST] = lambda body, src, sender: got.append("read-only")
    ro.handle_datagram(_hello(six, wall), SIX, 5.0, wall)
    ro.handle_datagram(six.encode(wire.REQUEST, {"rid": 3}, wall), SIX, 5.1, wall)
    assert got == [({"rid": 2}, SIX, 6)]


def test_membership_news_and_load_jumps_are_told_through_the_hooks():
    """A join goes to on_events (the daemon publishes it), with on_change to wake the
    timer loop; a node's gossiped load moving by balance_threshold calls on_load_jump
    (the balancer looks at once); a smaller move does not.  Time is the caller's."""
    import time

    from omuscd import wire

    g, six = _gossip()
    told: list[str] = []
    g.on_events = lambda events: told.extend(e.kind for e in events)
    g.on_change = lambda: told.append("change")
    g.on_load_jump = lambda: told.append("jump")
    g.due_hint = 100.0  # the timer loop sleeps until then
    wall = time.time()
    g.handle_datagram(_hello(six, wall), SIX, 7.0, wall)
    assert told == ["join", "change"]  # the join is news to pass on: due at once
    assert g.members.nodes[6].heard == pytest.approx(7.0)
    # a HELLO gets an answer (a page of our table) only by lot or if asked: this one
    # asked nothing, and one node in a cluster of two always answers
    assert [wire.TYPE_NAMES[g.codec.decode(d, wall).header.mtype] for d, _ in g.raw.out] \
        in ([], ["sync"])

    def ping(load: float, hb: int, seq: int) -> bytes:
        e = entry(6, boot=88, inc=2, hb=hb, load=load)
        return six.encode(wire.PING, {"seq": seq, "to": 1, "me": e}, wall)

    told.clear()
    g.handle_datagram(ping(0.7, 4, 1), SIX, 7.5, wall)  # 0.5 -> 0.7: below the threshold
    g.handle_datagram(ping(1.5, 5, 2), SIX, 8.0, wall)  # 0.7 -> 1.5: a jump
    assert "jump" in told and told.count("jump") == 1
    assert g.members.nodes[6].entry["load"] == 1.5
