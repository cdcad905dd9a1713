"""The control port: a line protocol for ``telnet``, ``nc``, scripts and the console.

Telnet clients may send option negotiation at any time; :class:`TelnetFilter` removes it
(refusing every option, so the client stays in its plain line mode) and turns IAC IP
(Ctrl-C) into an interrupt.  :class:`LineReader` bounds what one line may cost, so a client
sending junk gets a 4xx reply, not the daemon's memory.
"""

from __future__ import annotations

import hashlib
import hmac
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
from omuscd.jobs import FINAL, LOST
from omuscd.version import VERSION_STRING

if TYPE_CHECKING:
    from omuscd.daemon import Daemon

log = logging.getLogger("omuscd.control")

IAC, DONT, DO, WONT, WILL, SB, SE = 255, 254, 253, 252, 251, 250, 240
IP, BRK, AO, EL = 244, 243, 245, 248
MAX_SESSIONS = 64


class Interrupt:
    """Ctrl-C from a telnet client (IAC IP or IAC BRK)."""


class TooLong:
    """A line longer than :data:`commands.MAX_LINE` bytes (already discarded)."""


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

    async def run(self) -> None:
        reader = LineReader(self.stream, self.max_line)
        greeting = [f"{VERSION_STRING} node {self.daemon.name} "
                    f"(id {self.daemon.node_id}) ready; 'help' lists commands"]
        if self.secret is not None:
            self.authenticated = False
            self.challenge = secrets.token_hex(16)
            greeting.append(f"challenge {self.challenge}: answer 'auth RESPONSE'")
        await self.send(Reply(commands.GREETING, greeting))
        while True:
            item = await reader.next()
            if item is None:
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
            await self.send(reply)
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
            self.uid, self.gid, self.groups = 0, 0, [0]  # the password is root's
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
                                await self.daemon.jobs.act(job.id, "kill", self.uid or 0,
                                                           payload[0])
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
        gone = False
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
                            await self.daemon.jobs.act(job.id, "kill", self.uid or 0,
                                                       signal.SIGINT)
                        except commands.JobError:
                            pass
                        continue
                    gone = item is None
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(until_input)
            async for item in self._output(job, offsets):
                if item is None:
                    for stream, rest in partial.items():
                        if rest:
                            await emit(stream, rest)
                    doc = self._end_doc(job)
                    await self.send(Reply(code, [doc["text"] or job.state]))
                    nursery.cancel_scope.cancel()
                    return True
                stream, data = item
                *lines, partial[stream] = (partial[stream] + data).split(b"\n")
                for line in lines:
                    await emit(stream, line)
        if gone:
            return False
        await self.send(Reply(code, [f"detached from job {job.id}"]))
        return True


class ControlServer:
    """Serves sessions on the TCP control port and on the Unix socket."""

    def __init__(self, daemon: Daemon, secret: bytes | None):
        self.daemon = daemon
        self.secret = secret
        self.sessions = 0

    async def _serve(self, stream: trio.abc.Stream, peer: str, admin: bool, user: str,
                     secret: bytes | None, **identity: Any) -> None:
        if self.sessions >= MAX_SESSIONS:
            with trio.move_on_after(2):
                await stream.send_all(commands.err(commands.BUSY, "too many sessions; try "
                                                   "again later").render())
            await stream.aclose()
            return
        self.sessions += 1
        session = Session(self.daemon, stream, peer, admin, user, secret, **identity)
        log.debug("control: session from %s (%s)", peer, user)
        try:
            await session.run()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError) as e:
            log.debug("control: session from %s ended: %s", peer, e)
        except Exception:
            log.exception("control: internal error in a session from %s (closed)", peer)
        finally:
            self.sessions -= 1
            await trio.aclose_forcefully(stream)

    async def handle_tcp(self, stream: trio.SocketStream) -> None:
        try:
            host, port = stream.socket.getpeername()[:2]
            peer = f"{host}:{port}"
        except OSError:
            peer = "?"
        # TCP carries no identity: whoever passes the password (or reaches loopback when
        # none is set) controls the daemon, as with the original telnet port.
        await self._serve(stream, peer, True, f"tcp:{peer}", self.secret)

    async def handle_unix(self, stream: trio.SocketStream) -> None:
        pid, uid, gid = peer_cred(stream.socket)
        try:
            user = pwd.getpwuid(uid).pw_name if uid is not None else "?"
        except KeyError:
            user = str(uid)
        admin = uid is not None and uid in (0, os.geteuid())
        # the socket's owner is known from the kernel: no password needed
        await self._serve(stream, f"unix:{user}", admin, user, None, uid=uid,
                          gid=gid, groups=peer_groups(pid), max_line=UNIX_MAX_LINE)

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
