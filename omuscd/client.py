"""The one control-protocol client: used by ``omuscd ctl``, the examples and the tests.

:class:`ReplyParser` is the single place that understands ``NNN-`` / ``NNN `` framing;
the blocking :class:`ControlClient` wraps it for scripts, and the console will wrap the
same parser around a trio stream.
"""

from __future__ import annotations

import json
import re
import socket

# typing and collections.abc for the annotations only: every `omuscd run` imports this
# module, and those two took a fifth of its start (omuscd.runclient)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any

_LINE = re.compile(r"^(\d{3})([ -])(.*)$")


class ProtocolError(Exception):
    """The daemon said something that is not a numbered reply line."""


class Reply:
    """A reply: its code and its lines.  A plain class, not a dataclass: that module took
    6 ms of every ``omuscd run`` to import, a quarter of the client's start."""

    __slots__ = ("code", "lines")

    def __init__(self, code: int, lines: list[str]) -> None:
        self.code, self.lines = code, lines

    def __repr__(self) -> str:
        return f"Reply(code={self.code!r}, lines={self.lines!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Reply) and (self.code, self.lines) == (other.code,
                                                                          other.lines)

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it was

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def preliminary(self) -> bool:
        """A ``1xx`` line (a command's progress): its final reply is still to come."""
        return 100 <= self.code < 200

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def json(self) -> Any:
        """The document of a ``--json`` reply."""
        return json.loads(self.lines[-1])


class ReplyParser:
    """Feed lines; get a :class:`Reply` when the final ``NNN text`` line arrives."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.code: int | None = None

    def feed(self, line: str) -> Reply | None:
        m = _LINE.match(line.rstrip("\r\n"))
        if not m:
            raise ProtocolError(f"not a reply line: {line[:80]!r}")
        code, sep, text = int(m.group(1)), m.group(2), m.group(3)
        if self.code is not None and code != self.code:
            raise ProtocolError(f"reply code changed from {self.code} to {code}")
        self.code = code
        self.lines.append(text)
        if sep == " ":
            reply = Reply(code, self.lines)
            self.lines, self.code = [], None
            return reply
        return None


def auth_response(challenge: str, secret: bytes) -> str:
    """The answer to a ``challenge`` (Varnish CLI scheme)."""
    import hashlib

    c = challenge.encode()
    return hashlib.sha256(c + b"\n" + secret + c + b"\n").hexdigest()


class ControlClient:
    """A blocking client for one control session."""

    def __init__(self, sock: socket.socket, secret: bytes | None = None, timeout: float = 10):
        self.sock = sock
        self.sock.settimeout(timeout)
        # bytes, not text: after 'attach --binary' frames follow in the same buffer
        self.file = sock.makefile("rb")
        self.greeting = self.read_reply()
        m = re.search(r"challenge ([0-9a-f]+)", self.greeting.text)
        if m:
            if secret is None:
                raise PermissionError("the control port asks for a password: give a "
                                      "secret file")
            reply = self.command(f"auth {auth_response(m.group(1), secret)}")
            if not reply.ok:
                raise PermissionError(reply.text)

    @classmethod
    def tcp(cls, host: str = "127.0.0.1", port: int = 4271, secret: bytes | None = None,
            timeout: float = 10) -> ControlClient:
        return cls(socket.create_connection((host, port), timeout=timeout), secret, timeout)

    @classmethod
    def unix(cls, path: str, timeout: float = 10) -> ControlClient:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(path)
        return cls(s, None, timeout)

    def wait_as_long_as_it_takes(self) -> None:
        """No read timeout for the rest of the session: for commands the daemon bounds
        itself (a move: its own steps' timeouts), where a fixed client timeout said
        "timed out" about moves that then succeeded."""
        self.sock.settimeout(None)

    def read_line(self) -> str:
        line = self.file.readline()
        if not line:
            raise ConnectionError("the daemon closed the session")
        return line.decode("utf-8", errors="replace")

    def read_exactly(self, n: int) -> bytes:
        data = self.file.read(n)
        if len(data) < n:
            raise ConnectionError("the daemon closed the session")
        return data

    def read_reply(self) -> Reply:
        parser = ReplyParser()
        while True:
            reply = parser.feed(self.read_line())
            if reply is not None:
                return reply

    def command(self, line: str, progress: Callable[[str], None] | None = None) -> Reply:
        """Send a command; its final reply.  The preliminary replies before it (a move's
        progress, ``110`` lines) go to ``progress`` if given, else nowhere."""
        self.sock.sendall(line.encode() + b"\n")
        while True:
            reply = self.read_reply()
            if not reply.preliminary:
                return reply
            if progress is not None:
                progress(reply.text)

    def stream(self, line: str) -> Iterator[str]:
        """Send a streaming command (``watch``) and yield its lines as they come."""
        self.sock.sendall(line.encode() + b"\n")
        parser = ReplyParser()
        while True:
            raw = self.read_line()
            reply = parser.feed(raw)
            yield _LINE.match(raw.rstrip("\r\n")).group(3)  # type: ignore[union-attr]
            if reply is not None:
                return

    def close(self) -> None:
        try:
            self.sock.sendall(b"quit\n")
        except OSError:
            pass
        self.file.close()
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_target(target: str | None) -> tuple[str, str, int]:
    """Where ``target`` points: ``("unix", PATH, 0)`` or ``("tcp", HOST, PORT)``.  A path
    contains '/'; ``HOST[:PORT]`` is TCP; None is the local daemon's socket if it exists,
    else 127.0.0.1:4271.  Shared by ``omuscd ctl`` and the console."""
    import os

    from omuscd.paths import DEFAULT_CONTROL_PORT, default_socket

    if target is None:
        path = default_socket()
        if os.path.exists(path):
            return "unix", path, 0
        return "tcp", "127.0.0.1", DEFAULT_CONTROL_PORT
    if "/" in target:
        return "unix", target, 0
    host, sep, port = target.rpartition(":")
    if not sep:
        host, port = target, str(DEFAULT_CONTROL_PORT)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port in {target!r}")
    return "tcp", host.strip("[]"), int(port)


def connect(target: str | None = None, secret: bytes | None = None,
            timeout: float = 10) -> ControlClient:
    """Connect to ``target`` (see :func:`parse_target`)."""
    kind, where, port = parse_target(target)
    if kind == "unix":
        return ControlClient.unix(where, timeout)
    return ControlClient.tcp(where, port, secret, timeout)
