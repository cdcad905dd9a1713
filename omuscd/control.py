"""The control port: a line protocol for ``telnet``, ``nc``, scripts and the console.

Telnet clients may send option negotiation at any time; :class:`TelnetFilter` removes it
(refusing every option, so the client stays in its plain line mode) and turns IAC IP
(Ctrl-C) into an interrupt.  :class:`LineReader` bounds what one line may cost, so a client
sending junk gets a 4xx reply, not the daemon's memory.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import pwd
import secrets
import signal
import socket
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from omuscd import commands
from omuscd.commands import Reply
from omuscd.jobs.record import FINAL, LOST
from omuscd.version import VERSION_STRING

if TYPE_CHECKING:
    from omuscd.daemon import Daemon

log = logging.getLogger("omuscd.control")

IAC, DONT, DO, WONT, WILL, SB, SE = 255, 254, 253, 252, 251, 250, 240
IP, BRK, AO, EL = 244, 243, 245, 248
#: an unanswered password challenge holds a session this long at most
AUTH_TIMEOUT = 10.0


class Interrupt:
    """Ctrl-C from a telnet client (IAC IP or IAC BRK)."""


class TooLong:
    """A line longer than :data:`commands.MAX_LINE` bytes (already discarded)."""


@dataclass(frozen=True)
class Idle:
    """The client sent no whole line for ``seconds``."""

    seconds: float


class TelnetFilter:
    """Strips telnet commands from a byte stream.

    ``feed`` returns the clean bytes (with ``None`` marking an interrupt) and the
    negotiation replies to send back: WONT to every DO, DONT to every WILL.
    """

    def __init__(self) -> None:
        self.state = "data"
        self.verb = 0

    def feed(self, data: bytes) -> tuple[list[bytes | None], bytes]:
        out: list[bytes | None] = []
        cur = bytearray()
        replies = bytearray()
        for b in data:
            st = self.state
            if st == "data":
                if b == IAC:
                    self.state = "iac"
                else:
                    cur.append(b)
            elif st == "iac":
                self.state = "data"
                if b == IAC:
                    cur.append(IAC)
                elif b in (DO, DONT, WILL, WONT):
                    self.state, self.verb = "opt", b
                elif b == SB:
                    self.state = "sb"
                elif b in (IP, BRK):
                    out.append(bytes(cur))
                    cur.clear()
                    out.append(None)
                elif b in (EL, AO):
                    cur.clear()
            elif st == "opt":
                self.state = "data"
                if self.verb == DO:
                    replies += bytes((IAC, WONT, b))
                elif self.verb == WILL:
                    replies += bytes((IAC, DONT, b))
            elif st == "sb":
                if b == IAC:
                    self.state = "sb-iac"
            elif st == "sb-iac":
                self.state = "data" if b == SE else "sb"
        if cur:
            out.append(bytes(cur))
        return out, bytes(replies)


class LineReader:
    """Lines (str), :class:`Interrupt`, :class:`TooLong` or ``bytes`` (not text) from a
    stream, after telnet filtering.  None at end of stream."""

    def __init__(self, stream: trio.abc.Stream, max_line: int = commands.MAX_LINE):
        self.stream = stream
        self.max_line = max_line
        self.filter = TelnetFilter()
        self.buf = bytearray()
        self.discarding = False
        self.pending: list[object] = []
        self.eof = False

    def _take(self, chunk: bytes) -> None:
        self.buf += chunk
        while True:
            nl = self.buf.find(b"\n")
            if nl < 0:
                if len(self.buf) > self.max_line:
                    self.buf.clear()
                    if not self.discarding:
                        self.discarding = True
                        self.pending.append(TooLong())
                return
            raw = bytes(self.buf[:nl])
            del self.buf[:nl + 1]
            if self.discarding:
                self.discarding = False
                continue
            if len(raw) > self.max_line:
                self.pending.append(TooLong())
                continue
            raw = raw.replace(b"\r\x00", b"").rstrip(b"\r")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                self.pending.append(raw)
                continue
            if any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in text):
                self.pending.append(raw)
                continue
            self.pending.append(text)

    async def next(self) -> object:
        while not self.pending:
            if self.eof:
                return None
            data = await self.stream.receive_some(4096)
            if not data:
                self.eof = True
                continue
            pieces, replies = self.filter.feed(data)
            if replies:
                await self.stream.send_all(replies)
            for piece in pieces:
                if piece is None:
                    self.buf.clear()
                    self.discarding = False
                    self.pending.append(Interrupt())
                else:
                    self._take(piece)
        return self.pending.pop(0)


#: Binary attach frames (``u8 type | u32 length | payload``), daemon to client:
FRAME_STDOUT, FRAME_STDERR, FRAME_END = 1, 2, 3
#: client to daemon: a signal to forward (payload: u8 signal number), input for a --stdin
#: job, and the end of that input
FRAME_SIGNAL, FRAME_STDIN, FRAME_STDIN_EOF = 6, 7, 8
FRAME = struct.Struct(">BI")
UNIX_MAX_LINE = 1 << 21  # a local 'run' carries the caller's environment


@dataclass
class Session:
    """One control connection; implements :class:`commands.Context`."""

    daemon: Daemon
    stream: trio.abc.Stream
    peer: str
    admin: bool
    user: str
    secret: bytes | None = None
    authenticated: bool = True
    challenge: str = ""
    uid: int | None = None
    gid: int | None = None
    groups: list[int] = field(default_factory=list)
    max_line: int = commands.MAX_LINE

    async def send(self, reply: Reply) -> None:
        await self.stream.send_all(reply.render())

    def _idle_limit(self) -> float:
        """Seconds this session may stay silent: the tunable, or less while a password
        challenge is unanswered (nobody types a SHA-256 by hand)."""
        idle = float(self.daemon.cfg.control_idle_timeout)
        return idle if self.authenticated else min(idle, AUTH_TIMEOUT)

    async def _next_line(self, reader: LineReader) -> object:
        """The next item from the client, or :class:`Idle` if it sent no whole line in
        time.  Attached and watching sessions read without this bound: their client is
        waiting for the daemon, not the other way round."""
        limit = self._idle_limit()
        with trio.move_on_after(limit):
            return await reader.next()
        return Idle(limit)

    async def _reply(self, reply: Reply) -> bool:
        """Send a reply, giving up (False) on a client that does not read it in time."""
        with trio.move_on_after(float(self.daemon.cfg.control_idle_timeout)):
            await self.send(reply)
            return True
        log.info("control: %s (%s) did not read its reply; closed", self.peer, self.user)
        return False

    async def run(self) -> None:
        reader = LineReader(self.stream, self.max_line)
        greeting = [f"{VERSION_STRING} node {self.daemon.name} "
                    f"(id {self.daemon.node_id}) ready; 'help' lists commands"]
        if self.secret is not None:
            self.authenticated = False
            self.challenge = secrets.token_hex(16)
            greeting.append(f"challenge {self.challenge}: answer 'auth RESPONSE'")
        if not await self._reply(Reply(commands.GREETING, greeting)):
            return
        while True:
            item = await self._next_line(reader)
            if item is None:
                return
            if isinstance(item, Idle):
                log.info("control: %s (%s) sent nothing for %g s; closed", self.peer,
                         self.user, item.seconds)
                with trio.move_on_after(2):
                    await self.send(commands.err(commands.BUSY, f"idle for {item.seconds:g} "
                                                 "s: closing this session"))
                return
            if isinstance(item, Interrupt):
                continue
            if isinstance(item, TooLong):
                await self.send(commands.err(commands.TOO_LONG, "line too long: at most "
                                             f"{commands.MAX_LINE} bytes; discarded"))
                continue
            if isinstance(item, bytes):
                await self.send(commands.err(commands.NOT_TEXT, "not a line of text "
                                             "(binary or control characters); discarded"))
                continue
            assert isinstance(item, str)
            reply = self._auth(item) if item.split()[:1] == ["auth"] else None
            if reply is None:
                try:
                    reply = await commands.execute(self, item)
                except Exception:  # a bug: this command fails, the daemon stays up
                    log.exception("control: internal error in %r", item[:80])
                    reply = commands.err(commands.FAILED, "internal error; see the daemon's "
                                         "log")
            if reply is None:
                continue
            if not await self._reply(reply):
                return
            if reply.attach is not None:
                if reply.binary:
                    await self._attach_binary(reader, reply.attach, reply.follow)
                    return
                if not await self._attach_text(reader, reply.attach, reply.follow):
                    return
            elif reply.stream:
                if not await self._watch(reader, reply.json, reply.recent):
                    return
            if reply.close:
                return

    def _auth(self, line: str) -> Reply | None:
        if self.secret is None or self.authenticated:
            return None
        words = line.split()
        if len(words) != 2:
            return commands.err(commands.BAD_ARGS, "usage: auth RESPONSE")
        c = self.challenge.encode()
        want = hashlib.sha256(c + b"\n" + self.secret + c + b"\n").hexdigest()
        if hmac.compare_digest(words[1].lower(), want):
            self.authenticated = True
            # the password is root's: full rights, as root has on the Unix socket
            self.uid, self.gid, self.groups, self.admin = 0, 0, [0], True
            return commands.ok("authenticated")
        log.warning("control: failed authentication from %s", self.peer)
        return Reply(commands.AUTH_FAILED, ["authentication failed"], close=True)

    async def _watch(self, reader: LineReader, as_json: bool, recent: int = 0) -> bool:
        """Stream events until a line, an interrupt or the end.  False if the client left."""
        import json

        events = self.daemon.bus.subscribe(recent=recent)
        gone = False
        async with trio.open_nursery() as nursery:

            async def until_input() -> None:
                nonlocal gone
                item = await reader.next()
                gone = item is None
                nursery.cancel_scope.cancel()

            nursery.start_soon(until_input)
            async with events:
                async for ev in events:
                    text = json.dumps(ev.to_json()) if as_json else ev.line()
                    await self.stream.send_all(f"{commands.WATCHING}-{text}\r\n".encode())
                # the bus dropped us for being too slow
                await self.send(Reply(commands.WATCHING, ["watch dropped: too slow"]))
                nursery.cancel_scope.cancel()
                return True
        if gone:
            return False
        await self.send(Reply(commands.WATCHING, ["end of watch"]))
        return True


    async def _output(self, job: Any, offsets: dict[int, int]) -> Any:
        """Yield ``(stream, data)`` from the job's spool as it grows, then ``None`` when it
        ended.  Readers keep their own offsets: nothing is buffered for them."""
        spool = self.daemon.jobs.spool
        generation = job.generation
        while True:
            changed = job.changed
            if job.generation != generation:  # rerun from the start elsewhere
                generation = job.generation
                offsets.update({FRAME_STDOUT: 0, FRAME_STDERR: 0})
            for stream in (FRAME_STDOUT, FRAME_STDERR):
                while offsets[stream] < job.offsets[stream]:
                    data = spool.read(job.id, stream, offsets[stream],
                                      min(job.offsets[stream], offsets[stream] + 65536))
                    if not data:
                        break
                    offsets[stream] += len(data)
                    yield stream, data
            if job.state in FINAL:
                yield None
                return
            await changed.wait()

    async def _signal(self, job: Any, sig: int) -> None:
        """Forward a signal from an attached client, with the session's own rights (an
        unidentified session has none: it never stands for root)."""
        if self.uid is None:
            raise commands.JobError("this session has no identity")
        await self.daemon.jobs.act(job.id, "kill", self.uid, sig)

    def _end_doc(self, job: Any) -> dict[str, Any]:
        doc = {"job": job.id, "state": job.state, "status": job.status_code(),
               "exit": job.exit, "text": job.exit_text(), "reason": job.reason,
               "node": job.node_name}
        if job.state == LOST:
            doc["text"] = f"job {job.id} lost: {job.reason}"
        return doc

    async def _attach_binary(self, reader: LineReader, job: Any, follow: bool) -> None:
        """Frames for ``omuscd run``: output, then the end; signals come back."""
        offsets = {s: (job.offsets[s] if follow else 0) for s in (FRAME_STDOUT, FRAME_STDERR)}
        raw = bytearray(reader.buf)  # anything the client sent after the line, unfiltered
        async with trio.open_nursery() as nursery:

            async def signals() -> None:
                buf = raw
                while True:
                    while len(buf) >= FRAME.size:
                        kind, length = FRAME.unpack_from(buf)
                        if len(buf) < FRAME.size + length:
                            break
                        payload = bytes(buf[FRAME.size:FRAME.size + length])
                        del buf[:FRAME.size + length]
                        try:
                            if kind == FRAME_SIGNAL and length == 1:
                                await self._signal(job, payload[0])
                            elif kind == FRAME_STDIN and payload:
                                await self.daemon.jobs.feed_stdin(job, payload)
                            elif kind == FRAME_STDIN_EOF:
                                await self.daemon.jobs.feed_stdin(job, b"")
                        except commands.JobError as e:
                            log.debug("attach: %s", e)
                    data = await self.stream.receive_some(4096)
                    if not data:  # the client left: detach, the job runs on
                        nursery.cancel_scope.cancel()
                        return
                    buf += data

            nursery.start_soon(signals)
            async for item in self._output(job, offsets):
                if item is None:
                    payload = json.dumps(self._end_doc(job)).encode()
                    await self.stream.send_all(FRAME.pack(FRAME_END, len(payload)) + payload)
                    break
                stream, data = item
                await self.stream.send_all(FRAME.pack(stream, len(data)) + data)
            nursery.cancel_scope.cancel()

    async def _attach_text(self, reader: LineReader, job: Any, follow: bool) -> bool:
        """Output as 230- lines for telnet users; a line detaches, Ctrl-C sends SIGINT.
        False if the client left."""
        offsets = {s: (job.offsets[s] if follow else 0) for s in (FRAME_STDOUT, FRAME_STDERR)}
        partial = {FRAME_STDOUT: b"", FRAME_STDERR: b""}
        gone = ended = False
        code = commands.OUTPUT

        async def emit(stream: int, line: bytes) -> None:
            text = line.decode(errors="replace").rstrip("\r")
            prefix = "stderr: " if stream == FRAME_STDERR else ""
            await self.stream.send_all(f"{code}-{prefix}{text}\r\n".encode())

        async with trio.open_nursery() as nursery:

            async def until_input() -> None:
                nonlocal gone
                while True:
                    item = await reader.next()
                    if isinstance(item, Interrupt):
                        try:
                            await self._signal(job, signal.SIGINT)
                        except commands.JobError:
                            pass
                        continue
                    gone = item is None
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(until_input)
            async for item in self._output(job, offsets):
                if item is None:
                    ended = True
                    break
                stream, data = item
                *lines, partial[stream] = (partial[stream] + data).split(b"\n")
                for line in lines:
                    await emit(stream, line)
            # stop reading before the last line goes out: the client's next command,
            # typed as soon as it sees that line, is a command, not a detach
            nursery.cancel_scope.cancel()
        if ended:
            for stream, rest in partial.items():
                if rest:
                    await emit(stream, rest)
            doc = self._end_doc(job)
            await self.send(Reply(code, [doc["text"] or job.state]))
            return True
        if gone:
            return False
        await self.send(Reply(code, [f"detached from job {job.id}"]))
        return True


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


class ControlServer:
    """Serves sessions on the TCP control port and on the Unix socket.

    Sessions are counted per user (uid; a client the daemon cannot identify counts by its
    address) and overall, so no user can take the port from the others; root's and the
    daemon user's sessions on the Unix socket count apart, so nobody can lock them out."""

    def __init__(self, daemon: Daemon, secret: bytes | None):
        self.daemon = daemon
        self.secret = secret
        self.sessions = 0  # every open session (status shows it)
        self.shared = 0  # those counted against control_sessions
        self.reserved = 0  # root's and the daemon user's Unix-socket sessions
        self.per_key: dict[object, int] = {}

    def _refusal(self, key: object, reserved: bool) -> str | None:
        """Why a new session may not open now, or None."""
        cfg = self.daemon.cfg
        total = int(cfg.control_sessions)
        if reserved:
            if self.reserved >= total:
                return f"too many sessions for root ({total} at once); try again later"
            return None
        if self.per_key.get(key, 0) >= int(cfg.control_user_sessions):
            return (f"too many sessions for you ({int(cfg.control_user_sessions)} at once); "
                    "close one or try again later")
        if self.shared >= total:
            return f"too many sessions ({total} at once); try again later"
        return None

    async def _serve(self, stream: trio.abc.Stream, peer: str, who: Identity, key: object,
                     secret: bytes | None, max_line: int = commands.MAX_LINE,
                     reserved: bool = False) -> None:
        refusal = self._refusal(key, reserved)
        if refusal is not None:
            log.info("control: refused a session from %s (%s): %s", peer, who.user, refusal)
            with trio.move_on_after(2):
                await stream.send_all(commands.err(commands.BUSY, refusal).render())
            await trio.aclose_forcefully(stream)
            return
        self.sessions += 1
        if reserved:
            self.reserved += 1
        else:
            self.shared += 1
            self.per_key[key] = self.per_key.get(key, 0) + 1
        session = Session(self.daemon, stream, peer, who.admin, who.user, secret, uid=who.uid,
                          gid=who.gid, groups=list(who.groups), max_line=max_line)
        log.debug("control: session from %s (%s)", peer, who.user)
        try:
            await session.run()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError) as e:
            log.debug("control: session from %s ended: %s", peer, e)
        except Exception:
            log.exception("control: internal error in a session from %s (closed)", peer)
        finally:
            self.sessions -= 1
            if reserved:
                self.reserved -= 1
            else:
                self.shared -= 1
                self.per_key[key] -= 1
                if not self.per_key[key]:
                    del self.per_key[key]
            await trio.aclose_forcefully(stream)

    async def handle_tcp(self, stream: trio.SocketStream) -> None:
        try:
            local = stream.socket.getsockname()
            remote = stream.socket.getpeername()
            peer = f"{remote[0]}:{remote[1]}"
        except OSError:
            local = remote = None
            peer = "?"
        if self.secret is not None:
            # beyond loopback, or by choice: the password is the way in (it is root's)
            who = Identity(f"tcp:{peer}")
        else:
            who = tcp_identity(stream.socket.family, local, remote, peer)
        # unidentified clients share one allowance per address (on loopback: one)
        key = ("uid", who.uid) if who.uid is not None else ("addr", remote and remote[0])
        await self._serve(stream, peer, who, key, self.secret)

    async def handle_unix(self, stream: trio.SocketStream) -> None:
        pid, uid, gid = peer_cred(stream.socket)
        if uid is None:  # cannot happen on Linux; no identity, no rights
            who = Identity("?")
        else:
            who = rights_of(uid, gid, peer_groups(pid), user_name(uid))
        # the socket's owner is known from the kernel: no password needed
        # root's and the daemon user's sessions here have room of their own: whatever
        # others hold, 'omuscd ctl' and 'omuscd run' as root get through
        await self._serve(stream, f"unix:{who.user}", who, ("uid", who.uid), None,
                          max_line=UNIX_MAX_LINE, reserved=who.admin)

    async def serve_tcp(self, host: str, port: int,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self.handle_tcp, listeners)
            task_status.started()

    async def serve_unix(self, path: str,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(path):
            if await _unix_in_use(path):
                raise OSError(f"control socket {path} is in use by another daemon")
            os.unlink(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        await sock.bind(path)
        os.chmod(path, 0o666)  # any local user may connect; the kernel tells us who
        sock.listen(16)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self.handle_unix,
                                    [trio.SocketListener(sock)])
                task_status.started()
        finally:
            try:
                os.unlink(path)
            except OSError:
                pass


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
    """The uid owning the client end of a TCP connection made on this machine, from the
    kernel (NETLINK_SOCK_DIAG, one exact lookup of the 4-tuple: no scan of the socket
    table).  The client's socket has our peer as its local end and our local end as its
    remote.  None when there is no such live socket: it closed already (its orphaned or
    TIME_WAIT remains report uid 0, which must never be taken for root), or the client is
    not on this machine."""
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
    return int(uid)


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
    uid = loopback_owner(family, local, remote)
    if uid is None:
        return unknown
    try:
        pw = pwd.getpwuid(uid)
        groups = os.getgrouplist(pw.pw_name, pw.pw_gid)
    except (KeyError, OSError):
        log.info("control: %s is uid %d, which has no account here: read-only", peer, uid)
        return unknown
    return rights_of(uid, pw.pw_gid, groups, pw.pw_name)


async def _unix_in_use(path: str) -> bool:
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with trio.move_on_after(1):
            await probe.connect(path)
            return True
        return True
    except OSError:
        return False
    finally:
        probe.close()
