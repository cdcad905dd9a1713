"""Who is at the other end of a control session, and what that gives them.

One rule for both doors (:func:`rights_of`): the Unix socket learns the caller's uid
from SO_PEERCRED (:func:`peer_cred`), the loopback TCP port from the kernel's socket
table through sock_diag (:func:`loopback_owner`, :func:`tcp_identity`).  A client the
kernel does not name may read, never change.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import pwd
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

import trio

log = logging.getLogger("omuscd.control")


@dataclass(frozen=True)
class Identity:
    """Who is at the other end of a session, and what that gives them.  One rule for both
    doors (:func:`rights_of`): the Unix socket learns the uid from SO_PEERCRED, the
    loopback TCP port from the kernel's socket table (:func:`loopback_owner`)."""

    user: str
    admin: bool = False
    uid: int | None = None
    gid: int | None = None
    groups: list[int] = field(default_factory=list)


def rights_of(uid: int, gid: int | None, groups: list[int], user: str) -> Identity:
    """Root and the daemon's own user may do everything; anyone else acts on their own
    jobs and reads the cluster."""
    return Identity(user, uid in (0, os.geteuid()), uid, gid, groups)


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def peer_cred(sock: trio.socket.SocketType) -> tuple[int | None, int | None, int | None]:
    """The connecting process's pid, uid and gid, from SO_PEERCRED: the kernel's word."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        return pid, uid, gid
    except OSError:
        return None, None, None


def peer_groups(pid: int | None) -> list[int]:
    """The supplementary groups of the connecting process (its job runs with them)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return [int(g) for g in line.split()[1:]]
    except (OSError, ValueError):
        pass
    return []


NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY, NLMSG_ERROR, NLM_F_REQUEST = 4, 20, 2, 1
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
NLMSG = struct.Struct("=IHHII")  # struct nlmsghdr
DIAG_REQ = struct.Struct("=BBBBI")  # struct inet_diag_req_v2, up to its socket id
SOCKID = struct.Struct("!HH16s16s")  # inet_diag_sockid: ports and addresses (big endian)
SOCKID_TAIL = struct.Struct("=III")  # ... interface, cookie (host order)
DIAG_MSG_TAIL = struct.Struct("=IIIII")  # inet_diag_msg after its id: expires .. inode
TCP_SYN_RECV, TCP_TIME_WAIT = 3, 6


def _diag_addr(family: int, host: str) -> bytes:
    raw = socket.inet_pton(family, host.split("%")[0])
    return raw + b"\0" * (16 - len(raw))


def loopback_owner(family: int, local: tuple[Any, ...], peer: tuple[Any, ...]
                   ) -> int | None:
    """The uid owning the client end of a TCP connection made on this machine (see
    :func:`loopback_socket`), or None."""
    found = loopback_socket(family, local, peer)
    return None if found is None else found[0]


def loopback_socket(family: int, local: tuple[Any, ...], peer: tuple[Any, ...]
                    ) -> tuple[int, int] | None:
    """The uid owning the client end of a TCP connection made on this machine, and that
    socket's inode, from the kernel (NETLINK_SOCK_DIAG, one exact lookup of the 4-tuple:
    no scan of the socket table).  The client's socket has our peer as its local end and
    our local end as its remote.  None when there is no such live socket: it closed
    already (its orphaned or TIME_WAIT remains report uid 0, which must never be taken
    for root), or the client is not on this machine.  The uid is the socket's creator's,
    not necessarily its holder's: see :func:`holder_uids`."""
    req = DIAG_REQ.pack(family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF)
    req += SOCKID.pack(peer[1], local[1], _diag_addr(family, peer[0]),
                       _diag_addr(family, local[0]))
    req += SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    msg = NLMSG.pack(NLMSG.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0) + req
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
            nl.settimeout(1)
            nl.sendto(msg, (0, 0))
            data = nl.recv(8192)
    except OSError as e:
        log.warning("control: cannot ask the kernel who owns a loopback connection: %s", e)
        return None
    # inet_diag_msg: family, state, timer, retrans (a byte each), the socket id, the rest
    tail = NLMSG.size + 4 + SOCKID.size + SOCKID_TAIL.size
    if len(data) < tail + DIAG_MSG_TAIL.size:
        return None  # NLMSG_ERROR: no such socket
    _length, kind, _flags, _seq, _pid = NLMSG.unpack_from(data)
    state = data[NLMSG.size + 1]
    if kind != SOCK_DIAG_BY_FAMILY or data[NLMSG.size] != family:
        return None
    *_, uid, inode = DIAG_MSG_TAIL.unpack_from(data, tail)
    if inode == 0 or state in (TCP_SYN_RECV, TCP_TIME_WAIT):
        return None  # no process holds it any more: its uid field means nothing
    return int(uid), int(inode)


def holder_uids(inode: int) -> set[int]:
    """Every uid (real, effective, saved, filesystem) of the processes that hold the socket
    ``inode`` open (a scan of /proc; empty if none does).

    Why: the kernel's uid of a socket is that of the process that created it, which need
    not be the one using it: CRIU restores a moved job's sockets as root, and a root
    program may make a socket and then become a user.  Such a socket, connected by the
    user, would otherwise carry root's rights."""
    link = f"socket:[{inode}]"
    uids: set[int] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if not any(_link(f"/proc/{pid}/fd/{fd}") == link for fd in fds):
                continue
            with open(f"/proc/{pid}/status") as f:
                line = next(ln for ln in f if ln.startswith("Uid:"))
            uids.update(int(u) for u in line.split()[1:])
        except (OSError, StopIteration, ValueError):
            continue  # gone meanwhile, or not ours to look at
    return uids


def _link(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def source_of(remote: tuple[Any, ...] | None) -> str | None:
    """The address an unidentified client is counted by: its own, or "loopback" (every
    127.x.y.z is a source address any local user may bind)."""
    if remote is None:
        return None
    try:
        addr = ipaddress.ip_address(remote[0].split("%")[0])
    except ValueError:
        return remote[0]
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return "loopback" if addr.is_loopback else str(addr)


def tcp_identity(family: int, local: tuple[Any, ...] | None,
                 remote: tuple[Any, ...] | None, peer: str) -> Identity:
    """The rights of a TCP client without a password: those of its account, if it is on
    this machine (a loopback peer) and the kernel names the socket's owner and the account
    exists; else none but reading (it might be anyone; refusing would only make it retry).
    Groups come from the account (os.getgrouplist), not from the process (the kernel
    names the socket, not its process), and the primary group is the account's."""
    unknown = Identity(f"an unidentified client at {peer}")
    if local is None or remote is None:
        return unknown
    try:
        addr = ipaddress.ip_address(remote[0].split("%")[0])
    except ValueError:
        return unknown
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # the kernel's lookup follows the mapping too
    if not addr.is_loopback:
        return unknown
    found = loopback_socket(family, local, remote)
    if found is None:
        return unknown
    uid, inode = found
    holders = holder_uids(inode)
    if holders != {uid}:
        # made by one account, held by another (a socket CRIU restored, one handed over
        # by a root program): neither is known to be asking
        log.info("control: %s: the socket is uid %d's, held by uids %s: read-only", peer,
                 uid, sorted(holders) or "none")
        return unknown
    try:
        pw = pwd.getpwuid(uid)
        groups = os.getgrouplist(pw.pw_name, pw.pw_gid)
    except (KeyError, OSError):
        log.info("control: %s is uid %d, which has no account here: read-only", peer, uid)
        return unknown
    return rights_of(uid, pw.pw_gid, groups, pw.pw_name)
