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
import secrets
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from omuscd.control import commands, protocol
from omuscd.control.protocol import (
    FRAME,
    FRAME_END,
    FRAME_NOTICE,
    FRAME_SIGNAL,
    FRAME_STDERR,
    FRAME_STDIN,
    FRAME_STDIN_EOF,
    FRAME_STDOUT,
    Reply,
)
from omuscd.control.services import Services
from omuscd.events import Progress
from omuscd.jobs.record import CHECKPOINTED, FINAL, LOST, JobError
from omuscd.version import VERSION_STRING

log = logging.getLogger("omuscd.control")

IAC, DONT, DO, WONT, WILL, SB, SE = 255, 254, 253, 252, 251, 250, 240
IP, BRK, AO, EL = 244, 243, 245, 248
#: an unanswered password challenge holds a session this long at most
AUTH_TIMEOUT = 10.0
#: a command still running after this long (a move) says how far it has got, with
#: ``110`` lines at most every PROGRESS_EVERY seconds, until its reply
PROGRESS_AFTER = 1.0
PROGRESS_EVERY = 0.5


class Interrupt:
    """Ctrl-C from a telnet client (IAC IP or IAC BRK)."""


class TooLong:
    """A line longer than :data:`protocol.MAX_LINE` bytes (already discarded)."""


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

    def __init__(self, stream: trio.abc.Stream, max_line: int = protocol.MAX_LINE):
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


UNIX_MAX_LINE = 1 << 21  # a local 'run' carries the caller's environment


@dataclass
class Session:
    """One control connection; implements :class:`commands.Context`."""

    services: Services
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
    max_line: int = protocol.MAX_LINE
    #: how far the running command has got (a move updates it; see _execute)
    progress: Progress = field(default_factory=Progress)

    async def send(self, reply: Reply) -> None:
        await self.stream.send_all(reply.render())

    def _idle_limit(self) -> float:
        """Seconds this session may stay silent: the tunable, or less while a password
        challenge is unanswered (nobody types a SHA-256 by hand)."""
        idle = float(self.services.cfg.control_idle_timeout)
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
        with trio.move_on_after(float(self.services.cfg.control_idle_timeout)):
            await self.send(reply)
            return True
        log.info("control: %s (%s) did not read its reply; closed", self.peer, self.user)
        return False

    async def run(self) -> None:
        reader = LineReader(self.stream, self.max_line)
        greeting = [f"{VERSION_STRING} node {self.services.status.name} "
                    f"(id {self.services.status.node_id}) ready; 'help' lists commands"]
        if self.secret is not None:
            self.authenticated = False
            self.challenge = secrets.token_hex(16)
            greeting.append(f"challenge {self.challenge}: answer 'auth RESPONSE'")
        if not await self._reply(Reply(protocol.GREETING, greeting)):
            return
        while True:
            item = await self._next_line(reader)
            if item is None:
                return
            if isinstance(item, Idle):
                log.info("control: %s (%s) sent nothing for %g s; closed", self.peer,
                         self.user, item.seconds)
                with trio.move_on_after(2):
                    await self.send(protocol.err(protocol.BUSY, f"idle for {item.seconds:g} "
                                                 "s: closing this session"))
                return
            if isinstance(item, Interrupt):
                continue
            if isinstance(item, TooLong):
                await self.send(protocol.err(protocol.TOO_LONG, "line too long: at most "
                                             f"{protocol.MAX_LINE} bytes; discarded"))
                continue
            if isinstance(item, bytes):
                await self.send(protocol.err(protocol.NOT_TEXT, "not a line of text "
                                             "(binary or control characters); discarded"))
                continue
            assert isinstance(item, str)
            reply = self._auth(item) if item.split()[:1] == ["auth"] else None
            if reply is None:
                reply = await self._execute(item)
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

    async def _run(self, line: str) -> Reply | None:
        try:
            return await commands.execute(self, line)
        except Exception:  # a bug: this command fails, the daemon stays up
            log.exception("control: internal error in %r", line[:80])
            return protocol.err(protocol.FAILED, "internal error; see the daemon's log")

    async def _execute(self, line: str) -> Reply | None:
        """Run one command.  A move (see commands.reports_progress) that runs past
        PROGRESS_AFTER tells the client how far it has got (``110`` lines, from
        :attr:`progress`, which the moves update), and its last state before the reply
        if any was told (``done``).  Other commands run as they are: no task, no
        checkpoint between the command and its reply (``shutdown`` answers before the
        daemon's end cancels the session)."""
        self.progress = progress = Progress()
        if not commands.reports_progress(line):
            return await self._run(line)
        told = [0]  # the version of the progress last sent
        reply: Reply | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._tell_progress, progress, told)
            reply = await self._run(line)
            nursery.cancel_scope.cancel()
        if told[0] and progress.version != told[0]:
            await self._send_progress(progress)
        return reply

    async def _tell_progress(self, progress: Progress, told: list[int]) -> None:
        await trio.sleep(PROGRESS_AFTER)
        while True:
            told[0] = await progress.changed_since(told[0])  # the state the line shows
            with trio.CancelScope(shield=True):  # a line goes out whole or not at all
                await self._send_progress(progress)
            await trio.sleep(PROGRESS_EVERY)

    async def _send_progress(self, progress: Progress) -> None:
        """One ``110`` line; a client that does not read it in time misses it (its
        reply still comes, or the session ends when that is not read either)."""
        with trio.move_on_after(float(self.services.cfg.control_idle_timeout)):
            await self.send(Reply(protocol.PROGRESS, [progress.line()]))

    def _auth(self, line: str) -> Reply | None:
        if self.secret is None or self.authenticated:
            return None
        words = line.split()
        if len(words) != 2:
            return protocol.err(protocol.BAD_ARGS, "usage: auth RESPONSE")
        c = self.challenge.encode()
        want = hashlib.sha256(c + b"\n" + self.secret + c + b"\n").hexdigest()
        if hmac.compare_digest(words[1].lower(), want):
            self.authenticated = True
            # the password is root's: full rights, as root has on the Unix socket
            self.uid, self.gid, self.groups, self.admin = 0, 0, [0], True
            return protocol.ok("authenticated")
        log.warning("control: failed authentication from %s", self.peer)
        return Reply(protocol.AUTH_FAILED, ["authentication failed"], close=True)

    async def _watch(self, reader: LineReader, as_json: bool, recent: int = 0) -> bool:
        """Stream events until a line, an interrupt or the end.  False if the client left."""
        import json

        events = self.services.events.subscribe(recent=recent)
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
                    await self.stream.send_all(f"{protocol.WATCHING}-{text}\r\n".encode())
                # the bus dropped us for being too slow
                await self.send(Reply(protocol.WATCHING, ["watch dropped: too slow"]))
                nursery.cancel_scope.cancel()
                return True
        if gone:
            return False
        await self.send(Reply(protocol.WATCHING, ["end of watch"]))
        return True


    async def _output(self, job: Any, offsets: dict[int, int]) -> Any:
        """Yield ``(stream, data)`` from the job's spool as it grows, then ``None`` when it
        ended.  Readers keep their own offsets: nothing is buffered for them."""
        spool = self.services.jobs.spool
        generation = job.generation
        revived = job.revived
        while True:
            changed = job.changed
            if job.generation != generation:  # rerun from the start elsewhere
                generation = job.generation
                offsets.update({FRAME_STDOUT: 0, FRAME_STDERR: 0})
            if job.revived != revived:  # its node died: it went back to a checkpoint
                revived = job.revived
                at = time.strftime("%H:%M:%S", time.localtime(job.revived_to))
                yield FRAME_NOTICE, (f"job {job.id} went back to its checkpoint of {at} "
                                     f"and runs on {job.node_name}").encode()
            for stream in (FRAME_STDOUT, FRAME_STDERR):
                while offsets[stream] < job.offsets[stream]:
                    data = spool.read(job.id, stream, offsets[stream],
                                      min(job.offsets[stream], offsets[stream] + 65536))
                    if not data:
                        break
                    offsets[stream] += len(data)
                    yield stream, data
            if job.state in FINAL or (job.state == CHECKPOINTED and job.ended):
                yield None  # ended (checkpoint --exit: for now)
                return
            await changed.wait()

    async def _signal(self, job: Any, sig: int) -> None:
        """Forward a signal from an attached client, with the session's own rights (an
        unidentified session has none: it never stands for root)."""
        if self.uid is None:
            raise JobError("this session has no identity")
        await self.services.jobs.act(job.id, "kill", self.uid, sig)

    def _end_doc(self, job: Any) -> dict[str, Any]:
        doc = {"job": job.id, "state": job.state, "status": job.status_code(),
               "exit": job.exit, "text": job.exit_text(), "reason": job.reason,
               "node": job.node_name}
        if job.state == LOST:
            doc["text"] = f"job {job.id} lost: {job.reason}"
        if job.state == CHECKPOINTED:
            doc["text"] = (f"job {job.id} was checkpointed and ended: 'omuscd ctl resume "
                           f"{job.id}' resumes it, 'omuscd attach {job.id}' follows it")
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
                                await self.services.jobs.feed_stdin(job, payload)
                            elif kind == FRAME_STDIN_EOF:
                                await self.services.jobs.feed_stdin(job, b"")
                        except JobError as e:
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
        code = protocol.OUTPUT

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
                        except JobError:
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
                if stream == FRAME_NOTICE:
                    await self.stream.send_all(f"{code}-omuscd: {data.decode()}\r\n".encode())
                    continue
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
