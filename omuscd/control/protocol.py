"""The control protocol's shared vocabulary: reply codes, the reply's wire form and the
binary frames of ``attach --binary``, for the daemon's sessions and its clients.

Replies are numbered like SMTP: ``2xx`` success, ``4xx`` bad request, ``5xx`` refused or
failed; ``NNN-text`` continues a reply and ``NNN text`` ends it.  A ``1xx`` line is a
preliminary reply, as in FTP: a command still running (a move) says how far it has got
with ``110 text`` lines, and its final reply follows; a client that only wants the final
reply skips them.  With ``--json`` a listing
answers in one line, ``200 {...}``.  (``omuscd run``'s client, :mod:`omuscd.runclient`,
keeps its own copy of the frame numbers: it imports nothing it can do without.)
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

# Reply codes (documented in omuscd-commands(7)).
PROGRESS = 110
OK = 200
WATCHING = 210
GREETING = 220
BYE = 221
OUTPUT = 230
ATTACHED = 250
UNKNOWN = 400
BAD_ARGS = 401
TOO_LONG = 402
NOT_TEXT = 403
NOT_FOUND = 404
FAILED = 500
NOT_PERMITTED = 501
AUTH_REQUIRED = 530
AUTH_FAILED = 531
BUSY = 421

REPLY_CODES: dict[int, str] = {
    PROGRESS: "progress of a command still running (preliminary: its reply follows)",
    OK: "success", WATCHING: "event stream (watch)", GREETING: "greeting on connect",
    BYE: "closing the session", OUTPUT: "job output (text attach)",
    ATTACHED: "attached: binary job frames follow", UNKNOWN: "unknown command",
    BAD_ARGS: "wrong arguments",
    TOO_LONG: "line too long", NOT_TEXT: "not a line of text", NOT_FOUND: "no such node or key",
    BUSY: "closing: too many sessions, or idle too long", FAILED: "failed",
    NOT_PERMITTED: "not permitted for this user",
    AUTH_REQUIRED: "authentication required", AUTH_FAILED: "authentication failed",
}

MAX_LINE = 4096

#: Binary attach frames (``u8 type | u32 length | payload``), daemon to client:
FRAME_STDOUT, FRAME_STDERR, FRAME_END = 1, 2, 3
#: a line for the user about the job (it went back to a checkpoint), printed on stderr
FRAME_NOTICE = 4
#: client to daemon: a signal to forward (payload: u8 signal number), input for a --stdin
#: job, and the end of that input
FRAME_SIGNAL, FRAME_STDIN, FRAME_STDIN_EOF = 6, 7, 8
FRAME = struct.Struct(">BI")  # kind, payload length


@dataclass
class Reply:
    code: int
    lines: list[str]
    stream: bool = False  # the session streams events after this reply (watch)
    json: bool = False
    close: bool = False  # the session ends after this reply
    attach: Any = None  # the job whose output the session streams after this reply
    binary: bool = False
    follow: bool = False
    recent: int = 0  # watch: replay this many recent events first

    def render(self) -> bytes:
        """Wire form: CR LF line ends (the telnet NVT convention).  A line break inside a
        line (a command's argument, say) is escaped: it would end the reply early."""
        lines = [ln.replace("\r", "\\r").replace("\n", "\\n") for ln in self.lines or [""]]
        if self.stream:  # more lines follow this reply: it stays open
            out = [f"{self.code}-{ln}" for ln in lines]
        else:
            out = [f"{self.code}-{ln}" for ln in lines[:-1]] + [f"{self.code} {lines[-1]}"]
        return ("\r\n".join(out) + "\r\n").encode()


def ok(*lines: str) -> Reply:
    return Reply(OK, list(lines) or ["ok"])


def err(code: int, text: str) -> Reply:
    return Reply(code, [text])


def json_reply(doc: Any) -> Reply:
    return Reply(OK, [json.dumps(doc, separators=(",", ":"), sort_keys=False)], json=True)
