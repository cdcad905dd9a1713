"""The control language, defined once.

:data:`COMMANDS` holds every command's name, arguments with their bounds, help and
handler, as the Varnish CLI does.  The same table drives the parser, ``help``, the
console's completion and the test that checks the man page, so none of them can drift.

Replies are numbered like SMTP: ``2xx`` success, ``4xx`` bad request, ``5xx`` refused or
failed; ``NNN-text`` continues a reply and ``NNN text`` ends it.  With ``--json`` a listing
answers in one line, ``200 {...}``.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from omuscd.config import TUNABLES, ConfigError

if TYPE_CHECKING:
    from omuscd.daemon import Daemon

# Reply codes (documented in omuscd-commands(7)).
OK = 200
WATCHING = 210
GREETING = 220
BYE = 221
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
    OK: "success", WATCHING: "event stream (watch)", GREETING: "greeting on connect",
    BYE: "closing the session", UNKNOWN: "unknown command", BAD_ARGS: "wrong arguments",
    TOO_LONG: "line too long", NOT_TEXT: "not a line of text", NOT_FOUND: "no such node or key",
    BUSY: "too many sessions", FAILED: "failed", NOT_PERMITTED: "not permitted for this user",
    AUTH_REQUIRED: "authentication required", AUTH_FAILED: "authentication failed",
}

LOG_LEVELS = ("debug", "info", "warning", "error")
MAX_LINE = 4096


@dataclass
class Reply:
    code: int
    lines: list[str]
    stream: bool = False  # the session streams events after this reply (watch)
    json: bool = False
    close: bool = False  # the session ends after this reply

    def render(self) -> bytes:
        """Wire form: CR LF line ends (the telnet NVT convention)."""
        lines = self.lines or [""]
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


class Context(Protocol):
    """What a handler may know of the session that called it."""

    daemon: Daemon
    admin: bool  # may change the daemon (set, log, shutdown)
    authenticated: bool
    user: str


# --------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Arg:
    name: str
    optional: bool = False
    choices: tuple[str, ...] | None = None
    kind: str = "word"  # word | int | float
    lo: float | None = None
    hi: float | None = None
    max_len: int = 256

    def syntax(self) -> str:
        text = "|".join(self.choices) if self.choices else self.name
        return f"[{text}]" if self.optional else text

    def check(self, value: str) -> Any:
        if len(value) > self.max_len:
            raise ValueError(f"{self.name} is longer than {self.max_len} characters")
        if self.choices and value.lower() not in self.choices:
            raise ValueError(f"{self.name} must be one of {', '.join(self.choices)}")
        if self.choices:
            return value.lower()
        if self.kind in ("int", "float"):
            try:
                num: float = int(value) if self.kind == "int" else float(value)
            except ValueError:
                raise ValueError(f"{self.name} must be a number") from None
            if (self.lo is not None and num < self.lo) or (self.hi is not None and num > self.hi):
                raise ValueError(f"{self.name} must be between {self.lo:g} and {self.hi:g}")
            return num
        return value


Handler = Callable[[Context, dict[str, Any]], Reply]


@dataclass(frozen=True)
class Command:
    name: str
    args: tuple[Arg, ...]
    help: str
    handler: Handler
    json: bool = False  # accepts --json
    admin: bool = False  # changes the daemon: needs an admin session
    before_auth: bool = False  # allowed before the password challenge is met
    details: str = ""

    @property
    def syntax(self) -> str:
        parts = [self.name] + [a.syntax() for a in self.args]
        if self.json:
            parts.append("[--json]")
        return " ".join(parts)


@dataclass
class Parsed:
    command: Command
    args: dict[str, Any] = field(default_factory=dict)
    json: bool = False


class ParseError(Exception):
    def __init__(self, code: int, text: str):
        super().__init__(text)
        self.code = code
        self.text = text


def parse(line: str) -> Parsed | None:
    """Parse one command line against the table; None for an empty line."""
    try:
        words = shlex.split(line, comments=False, posix=True)
    except ValueError as e:
        raise ParseError(BAD_ARGS, f"cannot split the line: {e}") from None
    if not words:
        return None
    name = words[0].lower()
    cmd = COMMANDS.get(name)
    if cmd is None:
        raise ParseError(UNKNOWN, f"unknown command {words[0][:40]!r}; 'help' lists them")
    rest = words[1:]
    want_json = False
    if cmd.json and "--json" in rest:
        rest.remove("--json")
        want_json = True
    if any(w.startswith("--") for w in rest):
        bad = next(w for w in rest if w.startswith("--"))
        raise ParseError(BAD_ARGS, f"unknown option {bad[:40]!r}; usage: {cmd.syntax}")
    required = sum(1 for a in cmd.args if not a.optional)
    if not required <= len(rest) <= len(cmd.args):
        raise ParseError(BAD_ARGS, f"usage: {cmd.syntax}")
    values: dict[str, Any] = {}
    for arg, word in zip(cmd.args, rest, strict=False):
        try:
            values[arg.name] = arg.check(word)
        except ValueError as e:
            raise ParseError(BAD_ARGS, f"{e}; usage: {cmd.syntax}") from None
    return Parsed(cmd, values, want_json)


def execute(ctx: Context, line: str) -> Reply | None:
    """Parse and run one line for a session.  Never raises for bad input."""
    try:
        parsed = parse(line)
    except ParseError as e:
        return err(e.code, e.text)
    if parsed is None:
        return None
    cmd = parsed.command
    if not ctx.authenticated and not cmd.before_auth:
        return err(AUTH_REQUIRED, "authentication required: answer the challenge with "
                   "'auth RESPONSE' (see omuscd-commands(7))")
    if cmd.admin and not ctx.admin:
        return err(NOT_PERMITTED, f"'{cmd.name}' is for root or the daemon's user "
                   f"(you are {ctx.user})")
    args = dict(parsed.args)
    args["json"] = parsed.json
    return cmd.handler(ctx, args)


# --------------------------------------------------------------------------- helpers
def fmt_duration(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in [header, *rows]]


# --------------------------------------------------------------------------- handlers
def h_help(ctx: Context, a: dict[str, Any]) -> Reply:
    name = a.get("command")
    if name:
        cmd = COMMANDS.get(name.lower())
        if cmd is None:
            return err(NOT_FOUND, f"no command {name[:40]!r}; 'help' lists them")
        lines = [cmd.syntax, "  " + cmd.help]
        if cmd.details:
            lines += ["  " + ln for ln in cmd.details.splitlines()]
        return ok(*lines)
    width = max(len(c.syntax) for c in COMMANDS.values())
    lines = [f"{c.syntax.ljust(width)}  {c.help}" for c in COMMANDS.values()]
    return ok(*lines, "replies: 2xx success, 4xx bad request, 5xx refused or failed")


def h_version(ctx: Context, a: dict[str, Any]) -> Reply:
    v = ctx.daemon.version_info()
    if a["json"]:
        return json_reply(v)
    return ok(f"{v['version']} (protocol {v['protocol']}, python package {v['package']})")


def h_status(ctx: Context, a: dict[str, Any]) -> Reply:
    st = ctx.daemon.status()
    if a["json"]:
        return json_reply(st)
    return ok(*ctx.daemon.status_lines(st))


NODE_HEADER = ["ID", "NAME", "ADDRESS", "ROLE", "STATE", "LOAD", "UTIL%", "CPUS", "MHZ",
               "MEMFREE", "JOBS", "AUTH", "HEARD"]


def h_nodes(ctx: Context, a: dict[str, Any]) -> Reply:
    views = ctx.daemon.node_views()
    if a["json"]:
        return json_reply({"nodes": views})
    rows = [[("*" if v.get("self") else "") + str(v["id"]), v["name"],
             f"{v['address']}:{v['port']}", v["role"], v["state"], f"{v['load']:.2f}",
             f"{v['util']:.1f}", str(v["cpus"]), str(int(v["speed"])),
             f"{v['mem_free_mb']}M", str(v["jobs"]), v["auth"],
             fmt_duration(v["last_heard"]) + " ago"] for v in views]
    counts = ctx.daemon.members.counts()
    summary = f"{len(views)} nodes: this one and " + (
        ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no others")
    return ok(*table(rows, NODE_HEADER), summary)


def h_node(ctx: Context, a: dict[str, Any]) -> Reply:
    try:
        view = ctx.daemon.node_view(a["node"])
    except ValueError as e:
        return err(BAD_ARGS, str(e))
    if view is None:
        return err(NOT_FOUND, f"no node {a['node'][:40]!r}; 'nodes' lists them")
    if a["json"]:
        return json_reply(view)
    return ok(*[f"{k}: {v}" for k, v in view.items()])


def h_set(ctx: Context, a: dict[str, Any]) -> Reply:
    key = a["key"].replace("-", "_")
    if key not in TUNABLES:
        return err(NOT_FOUND, f"no tunable {a['key'][:40]!r}; 'get' lists them")
    try:
        value = ctx.daemon.set_tunable(key, a["value"])
    except ConfigError as e:
        return err(BAD_ARGS, str(e))
    return ok(f"{key} = {value}")


def h_get(ctx: Context, a: dict[str, Any]) -> Reply:
    values = ctx.daemon.tunables()
    key = a.get("key")
    if key is not None:
        key = key.replace("-", "_")
        if key not in values:
            return err(NOT_FOUND, f"no tunable {a['key'][:40]!r}; 'get' lists them")
        values = {key: values[key]}
    if a["json"]:
        return json_reply(values)
    return ok(*[f"{k} = {v}  ({TUNABLES[k].help}; {TUNABLES[k].bounds_text()})"
                for k, v in values.items()])


def h_log(ctx: Context, a: dict[str, Any]) -> Reply:
    ctx.daemon.set_log_level(a["level"])
    return ok(f"log level {a['level']}")


def h_watch(ctx: Context, a: dict[str, Any]) -> Reply:
    return Reply(WATCHING, ["watching cluster events; send any line to stop"], stream=True,
                 json=a["json"])


def h_quit(ctx: Context, a: dict[str, Any]) -> Reply:
    return Reply(BYE, ["bye"], close=True)


def h_shutdown(ctx: Context, a: dict[str, Any]) -> Reply:
    ctx.daemon.request_shutdown(f"'shutdown' from {ctx.user}")
    return Reply(OK, ["shutting down"], close=True)


def h_auth(ctx: Context, a: dict[str, Any]) -> Reply:
    # The session intercepts 'auth' (it owns the challenge); this runs only when there
    # was nothing to answer.
    return err(BAD_ARGS, "no challenge is pending on this session")


def _cmds(*cmds: Command) -> dict[str, Command]:
    return {c.name: c for c in cmds}


COMMANDS: dict[str, Command] = _cmds(
    Command("help", (Arg("command", optional=True, max_len=40),),
            "list the commands, or describe one", h_help, before_auth=True),
    Command("version", (), "this daemon's version and wire protocol", h_version, json=True),
    Command("status", (), "this node: configuration choices, load, security, counters",
            h_status, json=True,
            details="Each automatic choice says how it was made (plug'n'pray).\n"
                    "dropped: datagrams refused, by reason (malformed, unsigned,\n"
                    "bad-signature, replayed, stale, incompatible)."),
    Command("nodes", (), "the node table, this node first (marked *)", h_nodes, json=True,
            details="STATE is alive, suspect, dead or incompatible. LOAD is demand per\n"
                    "lent CPU (1.0 = all busy). AUTH: key, unverified or insecure."),
    Command("node", (Arg("node", max_len=64),), "everything known about one node, by id or "
            "name", h_node, json=True),
    Command("set", (Arg("key", max_len=40), Arg("value", max_len=40)),
            "change a tunable at run time (see 'get')", h_set, admin=True),
    Command("get", (Arg("key", optional=True, max_len=40),), "show tunables", h_get,
            json=True),
    Command("log", (Arg("level", choices=LOG_LEVELS),), "set the daemon's log level",
            h_log, admin=True),
    Command("watch", (), "stream cluster events until you send a line or disconnect",
            h_watch, json=True,
            details="Events: join, leave, dead, suspect, alive, restart, clash,\n"
                    "incompatible, forget, config. Ctrl-C (telnet IAC IP) stops too."),
    Command("auth", (Arg("response", max_len=64),), "answer the password challenge",
            h_auth, before_auth=True,
            details="RESPONSE is the hex SHA-256 of: challenge, newline, secret,\n"
                    "challenge, newline (the Varnish CLI scheme)."),
    Command("quit", (), "close this session", h_quit, before_auth=True),
    Command("shutdown", (), "stop the daemon gracefully (departure announced)", h_shutdown,
            admin=True),
)


def completions(prefix: str) -> list[str]:
    """Command names starting with ``prefix`` (for the console's tab completion)."""
    return sorted(n for n in COMMANDS if n.startswith(prefix.lower()))
