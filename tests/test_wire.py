import json
import random
import struct

import pytest

from omuscd import wire
from omuscd.wire import Codec, WireError

KEY = b"k" * 32
NOW = 1_700_000_000.0


def entry(nid=5, **kw):
    e = {"id": nid, "boot": 77, "inc": 1, "hb": 3, "age": 0, "name": f"n{nid}",
         "addr": "198.18.0.5", "port": 4270, "role": "peer", "rel": "1a0", "st": "up",
         "cpus": 2, "speed": 2000, "mem": 100, "load": 0.5, "util": 10.0, "runq": 1,
         "jobs": 0, "flags": []}
    e.update(kw)
    return e


def pair(key_a=KEY, key_b=KEY, version_a=wire.PROTOCOL_VERSION):
    return Codec(key_a, 5, 77, 1, version_a), Codec(key_b, 6, 88, 2)


def test_round_trip():
    a, b = pair()
    pkt = b.decode(a.encode(wire.GOSSIP, {"entries": [entry()]}, NOW), NOW)
    assert pkt.header.node_id == 5 and pkt.header.mtype == wire.GOSSIP and pkt.signed
    assert wire.check_entries(pkt.body) == [entry()]


def test_every_flipped_bit_is_refused():
    a, b = pair()
    data = a.encode(wire.HELLO, {"entry": entry()}, NOW)
    for i in range(0, len(data), 7):
        for bit in (0, 3, 7):
            bad = bytearray(data)
            bad[i] ^= 1 << bit
            with pytest.raises(WireError) as e:
                b.decode(bytes(bad), NOW)
            assert e.value.reason in ("bad-signature", "malformed", "unsigned")
    assert b.decode(data, NOW).header.seq == 1


def test_wrong_key_and_unsigned_are_refused():
    a, b = pair(key_a=b"x" * 32)
    with pytest.raises(WireError, match="bad-signature"):
        b.decode(a.encode(wire.HELLO, {}, NOW), NOW)
    a, b = pair(key_a=None)
    with pytest.raises(WireError, match="unsigned"):
        b.decode(a.encode(wire.HELLO, {}, NOW), NOW)


def test_keyless_receiver_accepts_but_cannot_verify():
    a, b = pair(key_b=None)
    assert b.decode(a.encode(wire.HELLO, {}, NOW), NOW).signed


def test_replays_are_refused_in_any_order_within_the_window():
    a, b = pair()
    msgs = [a.encode(wire.GOSSIP, {"entries": []}, NOW) for _ in range(10)]
    for m in reversed(msgs):
        b.decode(m, NOW)
    for m in msgs:
        with pytest.raises(WireError, match="replayed"):
            b.decode(m, NOW)


def test_replay_window_edges():
    g = wire.ReplayGuard(window=8)
    assert g.check(1, 1, 100)
    assert not g.check(1, 1, 92)  # fell out of the window: refused, not trusted
    assert g.check(1, 1, 93) and not g.check(1, 1, 93)
    assert g.check(1, 2, 1)  # another boot has its own window
    assert g.check(1, 1, 1000) and g.check(1, 1, 999)


def test_old_or_future_packets_are_stale():
    a, b = pair()
    with pytest.raises(WireError, match="stale"):
        b.decode(a.encode(wire.HELLO, {}, NOW - 1000), NOW)
    with pytest.raises(WireError, match="stale"):
        b.decode(a.encode(wire.HELLO, {}, NOW + 1000), NOW)


def test_other_version_is_authenticated_then_reported_incompatible():
    other = wire.PROTOCOL_VERSION + 1
    a, b = pair(version_a=other)
    with pytest.raises(wire.Incompatible) as e:
        b.decode(a.encode(wire.HELLO, {"entry": entry()}, NOW), NOW)
    assert e.value.header.version == other and e.value.header.node_id == 5
    forged = pair(key_a=b"y" * 32, version_a=other)[0]
    with pytest.raises(WireError, match="bad-signature"):
        b.decode(forged.encode(wire.HELLO, {}, NOW), NOW)


def test_random_junk_only_ever_raises_wire_errors():
    _, b = pair()
    rng = random.Random(1)
    for n in range(3000):
        size = rng.randrange(0, 200)
        junk = bytes(rng.randrange(256) for _ in range(size))
        if n % 3 == 0:
            junk = wire.MAGIC + junk
        with pytest.raises(WireError):
            b.decode(junk, NOW)


def test_bodies_that_are_not_objects_are_malformed():
    a, b = pair()
    head = wire.HEADER.pack(wire.MAGIC, wire.PROTOCOL_VERSION, wire.GOSSIP, 1, 5, 77, 1, 1,
                            NOW)
    for body in (b"[1,2]", b"\xff\xfe", b"{", b"[" * 100000):
        data = head + body
        data += a._tag(data)
        with pytest.raises(WireError, match="malformed"):
            b.decode(data, NOW)


@pytest.mark.parametrize("change", [
    {"id": 0}, {"id": "5"}, {"port": 0}, {"st": "gone"}, {"load": True}, {"age": -1},
    {"name": "x" * 65}, {"flags": [1]}, {"hb": None}, {"moves": [1]}, {"moves": [1, "2"]},
    {"moves": [-1, 0]}, {"moves": [True, 0]}, {"moves": {"in": 1, "out": 0}},
])
def test_bad_entries_are_malformed(change):
    with pytest.raises(WireError, match="malformed"):
        wire.check_entry(entry(**change))
    with pytest.raises(WireError, match="malformed"):
        wire.check_entry({k: v for k, v in entry().items() if k != "mem"})


def test_the_count_of_moves_is_optional_in_an_entry():
    assert wire.check_entry(entry(moves=[3, 1]))["moves"] == [3, 1]
    assert "moves" not in wire.check_entry(entry())  # from an older node


def test_entries_are_split_under_the_datagram_limit():
    a, b = pair()
    entries = [entry(i) for i in range(1, 60)]
    packets = wire.pack_entries(a, wire.SYNC, entries, NOW)
    assert len(packets) > 1
    assert all(len(p) <= wire.MAX_DATAGRAM for p in packets)
    got = [e for p in packets for e in wire.check_entries(b.decode(p, NOW).body)]
    assert got == entries


def test_header_layout_is_the_documented_one():
    a, _ = pair()
    data = a.encode(wire.LEAVE, {}, NOW)
    magic, version, mtype, flags, nid = struct.unpack_from(">4sHBBI", data)
    assert (magic, version, mtype, flags, nid) == (b"OMUS", wire.PROTOCOL_VERSION, 4, 1, 5)
    assert wire.HEADER.size == 44 and len(data) == 44 + len(b"{}") + 32


# --------------------------------------------------------------------------- bounds
# A NaN load gossiped to an insecure node once made 'nodes' answer 500 for an hour: a
# number that is not finite, or absurd for its field, drops the datagram at decode.
def signed_body(a: Codec, raw: bytes, mtype: int = wire.GOSSIP) -> bytes:
    """A datagram carrying ``raw`` as its body byte for byte (json.dumps would write NaN
    as a bare NaN too, but a forger need not use it)."""
    a.seq += 1
    head = wire.HEADER.pack(wire.MAGIC, wire.PROTOCOL_VERSION, mtype, wire.FLAG_SIGNED, 5, 77,
                            1, a.seq, NOW)
    return head + raw + a._tag(head + raw)


@pytest.mark.parametrize("field", ["load", "util", "speed", "mem", "cpus", "runq", "hb"])
@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
def test_non_finite_numbers_in_an_entry_are_malformed(field, number):
    a, b = pair()
    good = json.dumps({"entries": [entry()]}).encode()
    assert wire.check_entries(b.decode(signed_body(a, good), NOW).body) == [entry()]
    bad = json.dumps({"entries": [entry(**{field: "@"})]}).encode().replace(
        b'"@"', number.encode())
    with pytest.raises(WireError, match="malformed"):
        b.decode(signed_body(a, bad), NOW)


@pytest.mark.parametrize("raw", [
    b'{"rid": 1, "pressure": NaN, "cpus": 2}', b'{"rid": 1, "after": Infinity}',
    b'{"rid": 1, "after": 1e999}', b'{"rid": 1' + b"0" * 30 + b', "after": 1}',
])
def test_non_finite_or_huge_numbers_in_any_body_are_malformed(raw):
    a, b = pair()
    with pytest.raises(WireError, match="malformed"):
        b.decode(signed_body(a, raw, wire.REQUEST), NOW)


@pytest.mark.parametrize("change", [
    {"load": -0.5}, {"load": 1e300}, {"util": -1}, {"speed": -1}, {"speed": 1e12},
    {"mem": -5}, {"mem": 2**62}, {"cpus": -1}, {"cpus": 10**9}, {"runq": -1},
    {"jobs": -3}, {"jobs": 2**60}, {"hb": -1}, {"hb": 2**64}, {"inc": -1}, {"boot": -7},
    {"age": 2**60}, {"role": "r" * 17}, {"rel": "1" * 33},
    {"flags": ["f" * 33]}, {"load": float("nan")}, {"util": float("inf")},
])
def test_absurd_entry_values_are_malformed(change):
    with pytest.raises(WireError, match="malformed"):
        wire.check_entry(entry(**change))


def test_finite_rejects_what_float_would_take():
    assert wire.finite(2) == 2.0 and wire.finite(0.5) == 0.5
    for bad in ("nan", "1.5", float("nan"), float("-inf"), True, None, [1]):
        with pytest.raises(WireError, match="malformed"):
            wire.finite(bad)
