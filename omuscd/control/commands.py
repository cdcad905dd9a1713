"""The control language, defined once.

:data:`COMMANDS` holds every command's name, arguments with their bounds, help and
handler, as the Varnish CLI does.  The same table drives the parser, ``help``, the
console's completion and the test that checks the man page, so none of them can drift.

Handlers receive the session (:class:`Context`) and through it the node's
:class:`~omuscd.control.services.Services`: the job layer, the status views, the
settings, the event bus; never the daemon.  Reply codes and the reply's wire form are in
:mod:`omuscd.control.protocol`.
"""

from __future__ import annotations

import base64
import binascii
import inspect
import json
import os
import pwd
import shlex
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from omuscd import ids
from omuscd.config import TUNABLES, ConfigError
from omuscd.control.protocol import (
    ATTACHED,
    AUTH_REQUIRED,
    BAD_ARGS,
    BYE,
    FAILED,
    NOT_FOUND,
    NOT_PERMITTED,
    OK,
    OUTPUT,
    UNKNOWN,
    WATCHING,
    Reply,
    err,
    json_reply,
    ok,
)
from omuscd.control.services import Services
from omuscd.jobs.record import JobError, Owner

LOG_LEVELS = ("debug", "info", "warning", "error")


class Context(Protocol):
    """What a handler may know of the session that called it."""

    services: Services
    admin: bool  # may change the daemon (set, log, shutdown)
    authenticated: bool
    user: str
    uid: int | None  # known from the Unix socket's credentials, or 0 after a password
    gid: int | None
    groups: list[int]


# --------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Arg:
    name: str
    optional: bool = False
    choices: tuple[str, ...] | None = None
    kind: str = "word"  # word | int | float | job | job-or-pid | node (see omuscd.ids)
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
        if self.kind == "job" or (self.kind == "job-or-pid" and not value.isdigit()):
            return ids.job_id(value)  # BadId is a ValueError: the same 4xx
        if self.kind == "node":
            return ids.node_name(value)
        if self.kind in ("int", "float"):
            try:
                num: float = int(value) if self.kind == "int" else float(value)
            except ValueError:
                raise ValueError(f"{self.name} must be a number") from None
            if (self.lo is not None and num < self.lo) or (self.hi is not None and num > self.hi):
                raise ValueError(f"{self.name} must be between {self.lo:g} and {self.hi:g}")
            return num
        return value


@dataclass(frozen=True)
class Opt:
    """An option: a flag (``value`` None) or ``--name VALUE``."""

    name: str
    value: str | None = None
    max_len: int = 256

    def syntax(self) -> str:
        return f"[--{self.name}{' ' + self.value if self.value else ''}]"


Handler = Callable[[Context, dict[str, Any]], Any]


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
    options: tuple[Opt, ...] = ()
    rest: str | None = None  # name of the words after "--" (a command to run)
    rest_alt: str | None = None  # an option that may carry them instead (encoded)

    @property
    def syntax(self) -> str:
        parts = [self.name] + [o.syntax() for o in self.options]
        parts += [a.syntax() for a in self.args]
        if self.json:
            parts.append("[--json]")
        if self.rest:
            parts.append(f"-- {self.rest.upper()}...")
        return " ".join(parts)

    def option(self, name: str) -> Opt | None:
        if name == "json" and self.json:
            return Opt("json")
        return next((o for o in self.options if o.name == name), None)


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
    rest: list[str] = []
    values: dict[str, Any] = {}
    tail: list[str] | None = None
    words = words[1:]
    i = 0
    while i < len(words):
        w = words[i]
        if w == "--" and cmd.rest:
            tail = words[i + 1:]
            break
        if w.startswith("--") and len(w) > 2:
            opt = cmd.option(w[2:])
            if opt is None:
                raise ParseError(BAD_ARGS, f"unknown option {w[:40]!r}; usage: {cmd.syntax}")
            if opt.value is None:
                values[opt.name] = True
            else:
                if i + 1 >= len(words):
                    raise ParseError(BAD_ARGS, f"{w} needs a value; usage: {cmd.syntax}")
                i += 1
                if len(words[i]) > opt.max_len:
                    raise ParseError(BAD_ARGS, f"{w} value is longer than {opt.max_len}")
                values[opt.name] = words[i]
        else:
            rest.append(w)
        i += 1
    want_json = bool(values.pop("json", False))
    if cmd.rest:
        if not tail and not (cmd.rest_alt and cmd.rest_alt in values):
            raise ParseError(BAD_ARGS, f"give the command after '--'; usage: {cmd.syntax}")
        values[cmd.rest] = tail or []
    required = sum(1 for a in cmd.args if not a.optional)
    if not required <= len(rest) <= len(cmd.args):
        raise ParseError(BAD_ARGS, f"usage: {cmd.syntax}")
    for arg, word in zip(cmd.args, rest, strict=False):
        try:
            values[arg.name] = arg.check(word)
        except ValueError as e:
            raise ParseError(BAD_ARGS, f"{e}; usage: {cmd.syntax}") from None
    return Parsed(cmd, values, want_json)


async def execute(ctx: Context, line: str) -> Reply | None:
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
    try:
        result = cmd.handler(ctx, args)
        if inspect.isawaitable(result):
            result = await result
    except JobError as e:
        return err(FAILED, str(e))
    return result


# --------------------------------------------------------------------------- helpers
def fmt_duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
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
    v = ctx.services.status.version_info()
    if a["json"]:
        return json_reply(v)
    return ok(f"{v['version']} (protocol {v['protocol']}, python package {v['package']})")


def h_status(ctx: Context, a: dict[str, Any]) -> Reply:
    st = ctx.services.status.status()
    if a["json"]:
        return json_reply(st)
    return ok(*ctx.services.status.status_lines(st))


NODE_HEADER = ["ID", "NAME", "ADDRESS", "ROLE", "STATE", "LOAD", "UTIL%", "CPUS", "MHZ",
               "MEMFREE", "JOBS", "AUTH", "HEARD"]


def h_nodes(ctx: Context, a: dict[str, Any]) -> Reply:
    views = ctx.services.status.node_views()
    if a["json"]:
        return json_reply({"nodes": views})
    rows = [[("*" if v.get("self") else "") + str(v["id"]), v["name"],
             f"{v['address']}:{v['port']}", v["role"], v["state"], f"{v['load']:.2f}",
             f"{v['util']:.1f}", str(v["cpus"]), str(int(v["speed"])),
             f"{v['mem_free_mb']}M", str(v["jobs"]), v["auth"],
             fmt_duration(v["last_heard"]) + " ago"] for v in views]
    counts = ctx.services.status.node_counts()
    summary = f"{len(views)} nodes: this one and " + (
        ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no others")
    return ok(*table(rows, NODE_HEADER), summary)


def h_node(ctx: Context, a: dict[str, Any]) -> Reply:
    try:
        view = ctx.services.status.node_view(a["node"])
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
        value = ctx.services.settings.set_tunable(key, a["value"])
    except ConfigError as e:
        return err(BAD_ARGS, str(e))
    return ok(f"{key} = {value}")


def h_get(ctx: Context, a: dict[str, Any]) -> Reply:
    values = ctx.services.settings.tunables()
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
    ctx.services.settings.set_log_level(a["level"])
    return ok(f"log level {a['level']}")


def h_watch(ctx: Context, a: dict[str, Any]) -> Reply:
    from omuscd.events import HISTORY

    recent = a.get("recent") or "0"
    if not recent.isdigit() or int(recent) > HISTORY:
        return err(BAD_ARGS, f"--recent must be a number from 0 to {HISTORY}")
    return Reply(WATCHING, ["watching cluster events; send any line to stop"], stream=True,
                 json=a["json"], recent=int(recent))


def h_quit(ctx: Context, a: dict[str, Any]) -> Reply:
    return Reply(BYE, ["bye"], close=True)


def h_shutdown(ctx: Context, a: dict[str, Any]) -> Reply:
    ctx.services.shutdown(f"'shutdown' from {ctx.user}")
    return Reply(OK, ["shutting down"], close=True)


def h_auth(ctx: Context, a: dict[str, Any]) -> Reply:
    # The session intercepts 'auth' (it owns the challenge); this runs only when there
    # was nothing to answer.
    return err(BAD_ARGS, "no challenge is pending on this session")


# --------------------------------------------------------------------------- jobs
def _need_identity(ctx: Context) -> int:
    if ctx.uid is None:
        raise JobError("the daemon does not know who you are on this session: use the Unix "
                       "socket ('omuscd run', 'omuscd ctl') or a control password")
    return ctx.uid


async def h_run(ctx: Context, a: dict[str, Any]) -> Reply:
    from omuscd.jobs.home import Placement

    uid = _need_identity(ctx)
    if a.get("user"):
        if uid != 0:
            return err(NOT_PERMITTED, "only root may run jobs as another user")
        try:
            owner = Owner.of_uid(pwd.getpwnam(a["user"]).pw_uid)
        except KeyError:
            return err(NOT_FOUND, f"no user {a['user'][:40]!r}")
    elif uid == 0 and ctx.gid is None:
        owner = Owner.of_uid(0)
    else:
        owner = Owner(uid, ctx.gid if ctx.gid is not None else uid, list(ctx.groups),
                      ctx.user)
    chosen = [k for k in ("best", "home", "node", "among") if a.get(k)]
    if len(chosen) > 1:
        return err(BAD_ARGS, "choose one of --best, --home, --node, --among")
    how = chosen[0] if chosen else "best"
    try:  # node names as everywhere (see omuscd.ids)
        for name in [a["node"]] if a.get("node") else (a.get("among") or "").split(","):
            if name:
                ids.node_name(name)
    except ids.BadId as e:
        return err(BAD_ARGS, str(e))
    placement = Placement(how, a.get("node"), (a.get("among") or "").split(",") or None)
    env: dict[str, str]
    if a.get("env"):
        try:
            env = json.loads(base64.b64decode(a["env"], validate=True))
            assert isinstance(env, dict)
            env = {str(k): str(v) for k, v in env.items()}
        except (binascii.Error, ValueError, AssertionError):
            return err(BAD_ARGS, "--env must be base64 of a JSON object")
    else:
        home = pwd.getpwuid(owner.uid).pw_dir
        env = {"PATH": os.defpath, "HOME": home, "USER": owner.user, "LOGNAME": owner.user}
    argv = a["command"]
    if a.get("argv"):
        try:
            argv = json.loads(base64.b64decode(a["argv"], validate=True))
            assert isinstance(argv, list) and argv and all(isinstance(w, str) for w in argv)
        except (binascii.Error, ValueError, AssertionError):
            return err(BAD_ARGS, "--argv must be base64 of a JSON list of strings")
        if a["command"]:
            return err(BAD_ARGS, "give the command after '--' or with --argv, not both")
    cwd = a.get("cwd") or env.get("HOME", "/")
    if not os.path.isabs(cwd):
        return err(BAD_ARGS, "--cwd must be an absolute path")
    job = await ctx.services.jobs.start(owner, argv, cwd, env, placement,
                                      stay=bool(a.get("stay")),
                                      restartable=bool(a.get("restartable")),
                                      stdin=bool(a.get("stdin")))
    doc = {"job": job.id, "node": job.node, "name": job.node_name}
    if a["json"]:
        return json_reply(doc)
    return ok(f"job {job.id} started on {job.node_name} (id {job.node})")


JOB_HEADER = ["JOB", "OWNER", "HOME", "NODE", "STATE", "CPU", "RSS", "MIG", "AGE", "COMMAND",
              "NOTE"]


async def h_jobs(ctx: Context, a: dict[str, Any]) -> Reply:
    jobs = await ctx.services.jobs.cluster_jobs()
    if not a.get("all"):
        jobs = [j for j in jobs if j.state != "exited"]
    views = [j.view() for j in jobs]
    if a["json"]:
        return json_reply({"jobs": views})
    names = ctx.services.jobs.node_name
    now = time.time()
    rows = [[j.id, j.owner.user, names(j.home), j.node_name, j.state, f"{j.cpu:.1f}s",
             f"{j.rss_mb:.0f}M", str(j.migrations), fmt_duration((j.ended or now) - j.started),
             " ".join(j.argv)[:40], j.reason or j.exit_text() or j.cannot_move]
            for j in jobs]
    return ok(*table(rows, JOB_HEADER), f"{len(jobs)} jobs")


async def h_job(ctx: Context, a: dict[str, Any]) -> Reply:
    jobs = {j.id: j for j in await ctx.services.jobs.cluster_jobs()}
    job = jobs.get(a["job"])
    if job is None:
        return err(NOT_FOUND, f"no job {a['job'][:40]!r}; 'jobs --all' lists them")
    view = job.view()
    if a["json"]:
        return json_reply(view)
    return ok(*[f"{k}: {v}" for k, v in view.items()])


def parse_signal(text: str) -> int:
    name = text.upper()
    if name.isdigit():
        return int(name)
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise JobError(f"no signal {text!r}") from None


async def h_kill(ctx: Context, a: dict[str, Any]) -> Reply:
    uid = _need_identity(ctx)
    sig = parse_signal(a.get("signal") or "TERM")
    return ok(await ctx.services.jobs.act(a["job"], "kill", uid, sig))


async def h_stay(ctx: Context, a: dict[str, Any]) -> Reply:
    return ok(await ctx.services.jobs.act(a["job"], "stay", _need_identity(ctx)))


async def h_nostay(ctx: Context, a: dict[str, Any]) -> Reply:
    return ok(await ctx.services.jobs.act(a["job"], "nostay", _need_identity(ctx)))


def _own_job(ctx: Context, job_id: str) -> Any:
    jc = ctx.services.jobs
    job = jc.find(job_id)
    if job is None:
        raise JobError(f"no job {job_id!r} here: output and attach work on the job's home "
                       f"node (node {job_id.split('.')[0]})")
    uid = _need_identity(ctx)
    if uid not in (0, job.owner.uid):
        raise JobError(f"job {job.id} belongs to {job.owner.user}")
    return job


def h_output(ctx: Context, a: dict[str, Any]) -> Reply:
    job = _own_job(ctx, a["job"])
    n = int(a.get("lines") or 20)
    if not 1 <= n <= 10000:
        return err(BAD_ARGS, "--lines must be between 1 and 10000")
    spool = ctx.services.jobs.spool
    out = [f"stdout: {ln}" for ln in spool.tail_lines(job.id, 1, n)]
    out += [f"stderr: {ln}" for ln in spool.tail_lines(job.id, 2, n)]
    return ok(*out, f"job {job.id} {job.state}{': ' + job.exit_text() if job.exit else ''}")


def h_attach(ctx: Context, a: dict[str, Any]) -> Reply:
    job = _own_job(ctx, a["job"])
    what = "binary frames follow" if a.get("binary") else "send a line to detach"
    code = ATTACHED if a.get("binary") else OUTPUT
    # text: 230- lines follow until the final one; binary: this line ends, frames follow
    return Reply(code, [f"attached to job {job.id} on {job.node_name}; {what}"],
                 stream=not a.get("binary"), attach=job, binary=bool(a.get("binary")),
                 follow=bool(a.get("follow")))


def h_topology(ctx: Context, a: dict[str, Any]) -> Reply:
    return ok(ctx.services.settings.set_topology(a["role"]))


def _flag(flag: str, on: bool) -> Handler:
    async def handler(ctx: Context, a: dict[str, Any]) -> Reply:
        return ok(await ctx.services.jobs.set_flag_at(a.get("node"), flag, on))
    return handler


_AT_NODE = (Arg("node", optional=True, kind="node"),)
_AT_NODE_DETAILS = ("NODE (id or name) sets it on another node, over the authenticated\n"
                    "cluster channel; without it, on this node.")


async def h_migrate(ctx: Context, a: dict[str, Any]) -> Reply:
    uid = _need_identity(ctx)
    if a["job"].isdigit():  # a PID: any process of this node, taken over as a job
        if uid != 0:
            return err(NOT_PERMITTED, "only root may move a process that is not a cluster "
                       "job (migrate PID NODE)")
        return ok(await ctx.services.jobs.take_over(int(a["job"]), a["where"]))
    return ok(await ctx.services.jobs.act(a["job"], "migrate", uid, to=a["where"]))


async def h_expel(ctx: Context, a: dict[str, Any]) -> Reply:
    return ok(*await ctx.services.jobs.expel())


async def h_bring(ctx: Context, a: dict[str, Any]) -> Reply:
    return ok(*await ctx.services.jobs.bring())


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
                    "lent CPU (1.0 = all busy). AUTH: key, unverified or insecure.\n"
                    "HEARD: how old the node's figures are (last_heard, age); liveness\n"
                    "is STATE alone."),
    Command("node", (Arg("node", kind="node"),), "everything known about one node, by id or "
            "name", h_node, json=True,
            details="moved_in, moved_out: jobs migrated to and from it since it started."),
    Command("set", (Arg("key", max_len=40), Arg("value", max_len=40)),
            "change a tunable at run time (see 'get')", h_set, admin=True),
    Command("get", (Arg("key", optional=True, max_len=40),), "show tunables", h_get,
            json=True),
    Command("log", (Arg("level", choices=LOG_LEVELS),), "set the daemon's log level",
            h_log, admin=True),
    Command("watch", (), "stream cluster events until you send a line or disconnect",
            h_watch, json=True, options=(Opt("recent", "N", 6),),
            details="Events: join, leave, dead, suspect, alive, restart, clash,\n"
                    "incompatible, forget, config, job-start, job-exit, job-lost,\n"
                    "migrating, migrated, migration-failed, balance, reclaim, warning.\n"
                    "Ctrl-C (telnet IAC IP) stops too. --recent N first replays the\n"
                    "last N events (up to 200 are kept)."),
    Command("auth", (Arg("response", max_len=64),), "answer the password challenge",
            h_auth, before_auth=True,
            details="RESPONSE is the hex SHA-256 of: challenge, newline, secret,\n"
                    "challenge, newline (the Varnish CLI scheme)."),
    Command("quit", (), "close this session", h_quit, before_auth=True),
    Command("shutdown", (), "stop the daemon gracefully (departure announced)", h_shutdown,
            admin=True),
    Command("run", (), "start a job where the cluster has room (see omuscd run)", h_run,
            json=True, rest="command",
            options=(Opt("best"), Opt("home"), Opt("node", "NODE", 64),
                     Opt("among", "LIST", 1024), Opt("stay"), Opt("restartable"),
                     Opt("stdin"),
                     Opt("user", "USER", 64), Opt("cwd", "DIR", 4096),
                     Opt("env", "BASE64", 1 << 20), Opt("argv", "BASE64", 1 << 20)),
            rest_alt="argv",
            details="Placement: --best (default: most spare capacity), --home, --node,\n"
                    "--among ID,NAME,... The job runs as you, in your --cwd (default\n"
                    "your home) with --env (base64 JSON; default a minimal one).\n"
                    "--stdin: its input comes from an attached client (binary frames);\n"
                    "otherwise /dev/null. Such a job cannot migrate.\n"
                    "--argv (base64 JSON list) may replace '-- COMMAND...' (for words\n"
                    "holding newlines). Only root may give --user. Answers with the job id."),
    Command("jobs", (), "the cluster's jobs, the same on every node (--all: also ended)",
            h_jobs, json=True, options=(Opt("all"),)),
    Command("job", (Arg("job", kind="job"),), "everything known about one job", h_job,
            json=True),
    Command("kill", (Arg("job", kind="job"), Arg("signal", optional=True, max_len=16)),
            "send a signal (default TERM) to your job, wherever it runs", h_kill,
            details="While the job moves, the signal is held at its home and delivered\n"
                    "where it runs once the move ends, either way (the reply says so)."),
    Command("stay", (Arg("job", kind="job"),), "keep your job where it runs", h_stay),
    Command("nostay", (Arg("job", kind="job"),), "let your job migrate again", h_nostay),
    Command("output", (Arg("job", kind="job"),), "the last lines of your job's output",
            h_output, options=(Opt("lines", "N", 6),)),
    Command("attach", (Arg("job", kind="job"),), "stream your job's output (from the "
            "start, or --follow from now)", h_attach, options=(Opt("binary"), Opt("follow")),
            details="Text: 230- lines, stderr prefixed; a line detaches, Ctrl-C (IAC IP)\n"
                    "sends SIGINT. --binary: framed, for omuscd run (omuscd(8))."),
    Command("block", _AT_NODE, "accept no guest jobs", _flag("blocked", True), admin=True,
            details=_AT_NODE_DETAILS),
    Command("noblock", _AT_NODE, "accept guest jobs again", _flag("blocked", False),
            admin=True, details=_AT_NODE_DETAILS),
    Command("lstay", _AT_NODE, "keep the jobs started here on this node",
            _flag("lstay", True), admin=True, details=_AT_NODE_DETAILS),
    Command("nolstay", _AT_NODE, "let jobs started here go elsewhere", _flag("lstay", False),
            admin=True, details=_AT_NODE_DETAILS),
    Command("quiet", _AT_NODE, "stop announcing this node; peers send it no work",
            _flag("quiet", True), admin=True, details=_AT_NODE_DETAILS),
    Command("noquiet", _AT_NODE, "announce this node again", _flag("quiet", False),
            admin=True, details=_AT_NODE_DETAILS),
    Command("migrate", (Arg("job", kind="job-or-pid"), Arg("where", kind="node")),
            "move your running job (or, for root, any process by PID) to a node (id or "
            "name), home, or best", h_migrate,
            details="The job freezes, its images and output move over the cluster\n"
                    "channel, it resumes there (a big job's memory follows once it runs\n"
                    "there: post-copy); on any failure it resumes where it was.\n"
                    "Refused with the reason when it cannot move (stay, TCP connection,\n"
                    "shared memory, io_uring, a device mapping, traced, no CRIU).\n"
                    "JOB may be a PID of this node (root only): the process and its\n"
                    "children become a cluster job homed here, then move. It must lead\n"
                    "its own session (setsid) without a terminal; its files must exist\n"
                    "on the target at the same paths, and its PID must be free there\n"
                    "unless it is the init of its own PID namespace. The answer comes\n"
                    "when the move ends; signals sent meanwhile are held until then."),
    Command("topology", (Arg("role", choices=("peer", "controller", "drone")),),
            "switch this node's balancing topology at run time", h_topology, admin=True),
    Command("expel", (), "send guest jobs away: home, or elsewhere", h_expel, admin=True),
    Command("bring", (), "call this node's jobs home", h_bring, admin=True),
)


def completions(prefix: str) -> list[str]:
    """Command names starting with ``prefix`` (for the console's tab completion)."""
    return sorted(n for n in COMMANDS if n.startswith(prefix.lower()))
