"""The cluster datagram format: encoding, HMAC-SHA256 authentication, replay protection.

Layout of one UDP datagram (big-endian; documented in omuscd(8), section WIRE PROTOCOL)::

    off  len  field
    0    4    magic  b"OMUS"
    4    2    protocol version (= the omuscd version number)
    6    1    message type (1 HELLO, 2 GOSSIP, 3 SYNC, 4 LEAVE, 5 REQUEST, 6 OFFER,
                   7 PING, 8 ACK, 9 PING-REQ, 10 NACK, 11 PUSH-PULL)
    7    1    flags (bit 0: signed)
    8    4    sender node id
    12   8    sender boot id (random per daemon start)
    20   8    sender incarnation (start time in microseconds; larger is a newer start)
    28   8    sequence number (per boot, from 1)
    36   8    send time (IEEE double, Unix seconds)
    44   n    body: a UTF-8 JSON object
    -32  32   HMAC-SHA256 of every byte before it under the cluster key (zeros if unsigned)

The version rule: the magic, the version field, the fields up to the send time and the
trailing tag keep their meaning in every version, so a daemon can authenticate a packet of
another version and list its sender as ``incompatible`` without understanding the body.
"""

from __future__ import annotations

import hmac
import json
import math
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from omuscd.version import PROTOCOL_VERSION

MAGIC = b"OMUS"
HEADER = struct.Struct(">4sHBBIQQQd")
TAG_LEN = 32
MAX_DATAGRAM = 1400  # stay under a LAN MTU: no IP fragmentation
FLAG_SIGNED = 0x01

HELLO, GOSSIP, SYNC, LEAVE, REQUEST, OFFER = 1, 2, 3, 4, 5, 6
#: SWIM's failure detector (cluster/swim.py): a probe, its answer, a probe through a
#: helper, the helper's "no answer from it", and the periodic anti-entropy exchange.
PING, ACK, PING_REQ, NACK, PUSH_PULL = 7, 8, 9, 10, 11
TYPE_NAMES = {HELLO: "hello", GOSSIP: "gossip", SYNC: "sync", LEAVE: "leave",
              REQUEST: "request", OFFER: "offer", PING: "ping", ACK: "ack",
              PING_REQ: "ping-req", NACK: "nack", PUSH_PULL: "push-pull"}

#: Drop reasons, in the order ``status`` shows their counters.
DROP_REASONS = ("malformed", "unsigned", "bad-signature", "replayed", "stale", "incompatible")


class WireError(Exception):
    """A datagram was dropped; ``reason`` is one of :data:`DROP_REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Header:
    version: int
    mtype: int
    flags: int
    node_id: int
    boot: int
    inc: int
    seq: int
    sent: float


@dataclass
class Packet:
    header: Header
    body: dict[str, Any]
    signed: bool


class Incompatible(WireError):
    """An authentic packet of another protocol version; the header is still readable."""

    def __init__(self, header: Header, body: dict[str, Any]):
        super().__init__("incompatible", f"protocol version {header.version}")
        self.header = header
        self.body = body


class ReplayGuard:
    """Per-sender sliding window over sequence numbers, as IPsec does: a datagram is
    accepted once, in any order within the window, and never again.

    Senders are keyed by (node id, boot id), so a restarted daemon starts a new window and
    a captured datagram of an old boot is still refused by the send-time check.  Bounded:
    the least recently used senders are forgotten past ``max_senders``.
    """

    def __init__(self, window: int = 128, max_senders: int = 4096):
        self.window = window
        self.max_senders = max_senders
        self._state: OrderedDict[tuple[int, int], tuple[int, int]] = OrderedDict()

    def check(self, node_id: int, boot: int, seq: int) -> bool:
        """True (and recorded) if ``seq`` is new for that sender."""
        key = (node_id, boot)
        top, bits = self._state.get(key, (0, 0))
        if seq > top:
            shift = seq - top
            bits = ((bits << shift) | 1) & ((1 << self.window) - 1) if shift < self.window else 1
            top = seq
        else:
            offset = top - seq
            if offset >= self.window or bits >> offset & 1:
                return False
            bits |= 1 << offset
        self._state[key] = (top, bits)
        self._state.move_to_end(key)
        while len(self._state) > self.max_senders:
            self._state.popitem(last=False)
        return True


class Codec:
    """Encodes this node's datagrams and decodes everyone's.

    ``key`` None means no cluster key: datagrams go out unsigned and incoming ones are
    accepted without verification (the caller decides what an unverified peer may do).
    """

    def __init__(self, key: bytes | None, node_id: int, boot: int, inc: int,
                 version: int = PROTOCOL_VERSION, max_skew: float = 300.0):
        self.key = key
        self.node_id = node_id
        self.boot = boot
        self.inc = inc
        self.version = version
        self.max_skew = max_skew
        self.seq = 0
        self.replay = ReplayGuard()

    def _tag(self, data: bytes) -> bytes:
        assert self.key is not None
        return hmac.digest(self.key, data, "sha256")  # one call into OpenSSL

    def encode(self, mtype: int, body: dict[str, Any], now: float) -> bytes:
        self.seq += 1
        flags = FLAG_SIGNED if self.key is not None else 0
        head = HEADER.pack(MAGIC, self.version, mtype, flags, self.node_id, self.boot,
                           self.inc, self.seq, now)
        data = head + COMPACT.encode(body).encode()
        return data + (self._tag(data) if self.key is not None else bytes(TAG_LEN))

    def decode(self, data: bytes, now: float) -> Packet:
        """Check and decode one datagram; raise :class:`WireError` to drop it.

        Order matters: authenticity first, so that nothing a forger sends can reach the
        version, replay or membership logic.
        """
        if len(data) < HEADER.size + TAG_LEN + 2 or data[:4] != MAGIC:
            raise WireError("malformed", "too short or bad magic")
        payload, tag = data[:-TAG_LEN], data[-TAG_LEN:]
        (_, version, mtype, flags, node_id, boot, inc, seq,
         sent) = HEADER.unpack_from(payload)
        signed = bool(flags & FLAG_SIGNED)
        if self.key is not None:
            if not signed:
                raise WireError("unsigned", f"from node {node_id}")
            if not hmac.compare_digest(tag, self._tag(payload)):
                raise WireError("bad-signature", f"claims node {node_id}")
        header = Header(version, mtype, flags, node_id, boot, inc, seq, sent)
        body = _json_object(payload[HEADER.size:])
        if version != self.version:
            raise Incompatible(header, body or {})
        if body is None:
            raise WireError("malformed", "body is not a JSON object")
        if mtype not in TYPE_NAMES:
            raise WireError("malformed", f"unknown message type {mtype}")
        if not math.isfinite(sent) or abs(now - sent) > self.max_skew:
            raise WireError("stale", f"sent {now - sent:+.0f}s ago by node {node_id}")
        if seq < 1 or not self.replay.check(node_id, boot, seq):
            raise WireError("replayed", f"node {node_id} seq {seq}")
        return Packet(header, body, signed)


#: The largest integer a datagram may carry (boot ids and incarnations are below 2**63).
MAX_WIRE_INT = 2**64


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):  # 1e400 parses as infinity
        raise ValueError(f"{text[:20]} is not a finite number")
    return v


def _bounded_int(text: str) -> int:
    if len(text) > 21:  # a sign and 20 digits: enough for 2**64
        raise ValueError("integer too large")
    v = int(text)
    if abs(v) > MAX_WIRE_INT:
        raise ValueError("integer too large")
    return v


#: Compact JSON, made once: json.dumps and json.loads with options build an encoder or a
#: decoder per call, a good part of an idle daemon's cost of a datagram.
COMPACT = json.JSONEncoder(separators=(",", ":"))
_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float,
                            parse_int=_bounded_int)


def _json_object(raw: bytes) -> dict[str, Any] | None:
    """The body as a dict, or None.  Python's JSON reader takes NaN, Infinity and numbers
    too large for a double (as infinity) by default; a peer must not get them into the
    node table, where a NaN load once made 'nodes' fail for an hour, so they make the
    body malformed here, at the door, for every message type."""
    try:
        body = _DECODER.decode(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return body if isinstance(body, dict) else None


# --------------------------------------------------------------------------- entries
#: Fields of a node entry as gossiped (wire name -> type).  ``age`` is how long ago, in
#: milliseconds, the origin produced this heartbeat; it grows at every hop, so a receiver
#: can time a node's silence without synchronised clocks.
ENTRY_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (int,), "boot": (int,), "inc": (int,), "hb": (int,), "age": (int,),
    "name": (str,), "addr": (str,), "port": (int,), "role": (str,), "rel": (str,),
    "st": (str,), "cpus": (int,), "speed": (int, float), "mem": (int,),
    "load": (int, float), "util": (int, float), "runq": (int,), "jobs": (int,),
    "flags": (list,),
}
ENTRY_STATUS = ("up", "left")
#: The range of each numeric entry field, both ends included: what a real node can send,
#: with room to spare.  Anything else (a negative count, a load of 10^300, an age that
#: overflows a float when divided) drops the datagram as malformed.
ENTRY_RANGES: dict[str, tuple[float, float]] = {
    "id": (1, 2**32 - 1), "boot": (0, 2**63), "inc": (0, 2**63), "hb": (0, 2**63),
    "age": (0, 2**53),  # milliseconds
    "port": (1, 65535), "cpus": (0, 65536), "speed": (0, 10**7),  # MHz
    "mem": (0, 2**40),  # MB
    "load": (0, 10**6), "util": (0, 10**6), "runq": (0, 10**7), "jobs": (0, 10**7),
}
#: Longest text of each string field (characters).
ENTRY_LENGTHS = {"name": 64, "addr": 15, "role": 16, "rel": 32, "st": 8}
MAX_FLAG_LEN = 32


def check_entry(e: Any) -> dict[str, Any]:
    """Validate one gossiped node entry from a peer; raise WireError('malformed')."""
    if not isinstance(e, dict):
        raise WireError("malformed", "entry is not an object")
    for name, types in ENTRY_FIELDS.items():
        v = e.get(name)
        if not isinstance(v, types) or isinstance(v, bool):
            raise WireError("malformed", f"entry field {name!r} missing or of wrong type")
    for name, (lo, hi) in ENTRY_RANGES.items():
        v = e[name]
        if not lo <= v <= hi:  # False for NaN too
            raise WireError("malformed", f"entry field {name!r} out of range")
    for name, most in ENTRY_LENGTHS.items():
        if len(e[name]) > most:
            raise WireError("malformed", f"entry field {name!r} too long")
    if e["st"] not in ENTRY_STATUS:
        raise WireError("malformed", "entry values out of range")
    if not all(isinstance(f, str) and len(f) <= MAX_FLAG_LEN for f in e["flags"]) \
            or len(e["flags"]) > 16:
        raise WireError("malformed", "entry flags")
    n = e.get("n", 0)  # optional: SWIM's incarnation number (cluster/swim.py)
    if type(n) is not int or not 0 <= n < 2**53:
        raise WireError("malformed", "entry field 'n'")
    pr = e.get("pr", 0)  # optional: the sender's protocol revision (version.py)
    if type(pr) is not int or not 0 <= pr < 2**31:
        raise WireError("malformed", "entry field 'pr'")
    moves = e.get("moves", [0, 0])  # optional: the jobs moved in and out since its start
    if not (isinstance(moves, list) and len(moves) == 2 and
            all(type(m) is int and 0 <= m < 2**53 for m in moves)):
        raise WireError("malformed", "entry field 'moves'")
    return e


def finite(value: Any) -> float:
    """A number from a peer's message as a finite float; WireError('malformed') for
    anything else (a string such as "nan" too, which float() would take)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WireError("malformed", "not a number")
    v = float(value)
    if not math.isfinite(v):
        raise WireError("malformed", "not a finite number")
    return v


def check_entries(body: dict[str, Any], key: str = "entries") -> list[dict[str, Any]]:
    entries = body.get(key)
    if not isinstance(entries, list) or len(entries) > 256:
        raise WireError("malformed", f"{key!r} is not a list")
    return [check_entry(e) for e in entries]


def pack_entries(codec: Codec, mtype: int, entries: list[dict[str, Any]], now: float,
                 extra: dict[str, Any] | None = None) -> list[bytes]:
    """Encode ``entries`` into as few datagrams as fit :data:`MAX_DATAGRAM` each."""
    extra = extra or {}
    out: list[bytes] = []
    batch: list[dict[str, Any]] = []
    size = HEADER.size + TAG_LEN + 40 + len(json.dumps(extra))
    for e in entries:
        n = len(json.dumps(e, separators=(",", ":"))) + 1
        if batch and size + n > MAX_DATAGRAM:
            out.append(codec.encode(mtype, {**extra, "entries": batch}, now))
            batch, size = [], HEADER.size + TAG_LEN + 40 + len(json.dumps(extra))
        batch.append(e)
        size += n
    if batch or not out:
        out.append(codec.encode(mtype, {**extra, "entries": batch}, now))
    return out
