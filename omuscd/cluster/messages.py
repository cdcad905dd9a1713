"""The bodies of SWIM's datagrams (cluster/swim.py): checks of what a peer sent.

Every body may carry ``me`` (the sender's own entry: its figures travel with every probe;
gossip leaves it out), ``b`` (membership changes, see broadcasts.py; a compact refutation
"r" only to nodes of protocol revision 1, version.py), ``e`` (other nodes'
entries, each with its age) and ``you`` (the receiver's state as the sender sees it, so that
a suspected node hears of it and refutes at once). A malformed body raises
``wire.WireError("malformed")`` and changes nothing: every part is checked before any is
applied. """

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omuscd import wire

Address = tuple[str, int]


@dataclass(frozen=True)
class Outgoing:
    """A datagram a Swim wants sent (cluster/swim.py's drivers send it)."""

    dest: Address  # where to send
    mtype: int  # a wire message type
    body: dict[str, Any]  # JSON-able; the driver encodes it with wire.Codec


MAX_RECORDS = 64  # changes in one datagram (a 1400-byte datagram holds far fewer)
MAX_ENTRIES = 64  # entries in one datagram or push-pull page
#: alive (a whole entry), refuted (alive at an incarnation, without the entry: sent only
#: to nodes of protocol revision 1 or later), suspect, dead, left
RECORD_KINDS = ("a", "r", "s", "d", "l")
PAGE_STATES = ("a", "s", "d")


def _bad(detail: str) -> wire.WireError:
    return wire.WireError("malformed", detail)


def int_field(body: dict[str, Any], name: str, lo: int = 0, hi: int = 2**63) -> int:
    v = body.get(name)
    if type(v) is not int or not lo <= v <= hi:
        raise _bad(f"field {name!r} missing or out of range")
    return v


def _list(body: dict[str, Any], name: str, most: int) -> list[Any]:
    v = body.get(name, [])
    if not isinstance(v, list) or len(v) > most:
        raise _bad(f"{name!r} is not a list of at most {most}")
    return v


def check_record(r: Any) -> dict[str, Any]:
    """One membership change."""
    if not isinstance(r, dict) or r.get("k") not in RECORD_KINDS:
        raise _bad("change record")
    if r["k"] in ("a", "l"):
        e = wire.check_entry(r.get("e"))
        if r["k"] == "l" and e["st"] != "left":
            raise _bad("a departure record of a node that did not leave")
        return {"k": r["k"], "e": e}
    about = {"k": r["k"], "id": int_field(r, "id", 1, 2**32 - 1),
             "boot": int_field(r, "boot"), "n": int_field(r, "n", 0, 2**53)}
    if r["k"] == "r":
        return about
    return {**about, "by": int_field(r, "by", 1, 2**32 - 1)}


def check_page_item(p: Any) -> tuple[dict[str, Any], str]:
    if not isinstance(p, dict) or p.get("sw") not in PAGE_STATES:
        raise _bad("push-pull item")
    return wire.check_entry(p.get("e")), p["sw"]


def check_common(body: dict[str, Any]) -> dict[str, Any]:
    """The parts any SWIM body may carry, checked: me, b, e, you, page."""
    out: dict[str, Any] = {}
    me = body.get("me")
    out["me"] = wire.check_entry(me) if me is not None else None
    out["b"] = [check_record(r) for r in _list(body, "b", MAX_RECORDS)]
    out["e"] = [wire.check_entry(e) for e in _list(body, "e", MAX_ENTRIES)]
    out["page"] = [check_page_item(p) for p in _list(body, "page", MAX_ENTRIES)]
    you = body.get("you")
    if you is not None:
        if not isinstance(you, dict) or you.get("s") not in ("suspect", "dead"):
            raise _bad("'you'")
        out["you"] = (you["s"], int_field(you, "n", 0, 2**53))
    else:
        out["you"] = None
    return out


def check_address(v: Any) -> tuple[str, int]:
    if not (isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)
            and 0 < len(v[0]) <= 15 and type(v[1]) is int and 1 <= v[1] <= 65535):
        raise _bad("address")
    parts = v[0].split(".")
    if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 and int(p) < 256
                                  for p in parts):
        raise _bad("address")
    return v[0], v[1]


def json_size(value: Any) -> int:
    """Bytes ``value`` takes in a compact JSON body."""
    return len(wire.COMPACT.encode(value))


def bool_field(body: dict[str, Any], name: str) -> bool:
    v = body.get(name, False)
    if not isinstance(v, bool):
        raise _bad(f"field {name!r} is not true or false")
    return v
