"""One control session over a trio stream: the console's only way to reach a daemon.

The console speaks the daemon's command language and nothing else, whether the daemon is
in this process (``omuscd --tui``: a socket pair into its control server) or elsewhere
(``omuscd console HOST:PORT``).  Replies are parsed by :class:`omuscd.client.ReplyParser`,
the one parser every client uses.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import trio

from omuscd.client import ProtocolError, Reply, ReplyParser, auth_response, parse_target

MAX_LINE = 1 << 22  # a reply line (a --json listing of a big cluster) may be long


class LinkError(Exception):
    """The session failed: the daemon is gone, refused us, or spoke nonsense."""


class Link:
    """A control session.  Commands are serialised; a ``watch`` needs a link of its own."""

    def __init__(self, stream: trio.abc.Stream):
        self.stream = stream
        self._buf = bytearray()
        self._lock = trio.Lock()
        self.greeting: Reply | None = None

    async def _line(self) -> str:
        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                line = bytes(self._buf[:i + 1])
                del self._buf[:i + 1]
                return line.decode("utf-8", errors="replace")
            if len(self._buf) > MAX_LINE:
                raise LinkError("the daemon sent a line too long to be a reply")
            try:
                chunk = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                raise LinkError(f"connection lost: {e}") from None
            if not chunk:
                raise LinkError("the daemon closed the session")
            self._buf += chunk

    async def reply(self) -> Reply:
        parser = ReplyParser()
        while True:
            try:
                reply = parser.feed(await self._line())
            except ProtocolError as e:
                raise LinkError(str(e)) from None
            if reply is not None:
                return reply

    async def _send(self, line: str) -> None:
        try:
            await self.stream.send_all(line.encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            raise LinkError(f"connection lost: {e}") from None

    async def greet(self, secret: bytes | None) -> None:
        """Read the greeting and answer the password challenge if there is one."""
        self.greeting = await self.reply()
        m = re.search(r"challenge ([0-9a-f]+)", self.greeting.text)
        if m:
            if secret is None:
                raise LinkError("the control port asks for a password: give --secret FILE")
            await self._send(f"auth {auth_response(m.group(1), secret)}")
            answer = await self.reply()
            if not answer.ok:
                raise LinkError(f"authentication: {answer.text}")

    async def command(self, line: str,
                      progress: Callable[[str], None] | None = None) -> Reply:
        """One command's final reply; the preliminary ones before it (a move's
        progress, ``110`` lines) go to ``progress`` if given."""
        async with self._lock:
            await self._send(line)
            while True:
                reply = await self.reply()
                if not reply.preliminary:
                    return reply
                if progress is not None:
                    progress(reply.text)

    async def json(self, line: str) -> Any:
        reply = await self.command(line + " --json")
        if not reply.ok:
            raise LinkError(f"{line}: {reply.text}")
        try:
            return reply.json()
        except ValueError as e:
            raise LinkError(f"{line}: not JSON: {e}") from None

    async def watch(self, recent: int = 0, fallback: bool = False
                    ) -> AsyncIterator[dict[str, Any]]:
        """Stream events as JSON documents (the last ``recent`` first) until the daemon
        ends the watch.  With ``fallback``, a daemon too old for ``--recent`` is asked
        for the plain watch."""
        await self._send(f"watch --json --recent {recent}" if recent else "watch --json")
        first = True
        while True:
            line = (await self._line()).rstrip("\r\n")
            code, sep, text = line[:3], line[3:4], line[4:]
            if code == "401" and first and recent and fallback:
                await self._send("watch --json")
                continue
            if code != "210":
                raise LinkError(f"watch: {line[:80]}")
            if first:
                first = False
                continue
            if sep == " ":
                return
            try:
                yield json.loads(text)
            except ValueError:
                continue

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


Connector = Callable[[], Awaitable[Link]]


def connector(target: str | None, secret: bytes | None, timeout: float = 10) -> Connector:
    """A function that opens a greeted session to ``target`` (see ``parse_target``)."""
    kind, where, port = parse_target(target)

    async def connect() -> Link:
        try:
            with trio.fail_after(timeout):
                if kind == "unix":
                    stream: trio.abc.Stream = await trio.open_unix_socket(where)
                else:
                    stream = await trio.open_tcp_stream(where, port)
                link = Link(stream)
                await link.greet(secret)
                return link
        except trio.TooSlowError:
            raise LinkError(f"no answer from {describe(target)} within {timeout:g}s") from None
        except OSError as e:
            raise LinkError(f"cannot connect to {describe(target)}: "
                            f"{e.strerror or e}") from None
    return connect


def describe(target: str | None) -> str:
    kind, where, port = parse_target(target)
    return where if kind == "unix" else f"{where}:{port}"
