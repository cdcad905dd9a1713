"""Command line: ``omuscd [OPTIONS]`` runs the daemon; ``omuscd keygen FILE`` and
``omuscd ctl COMMAND...`` are the helpers.  The daemon's switches are generated from the
parameter table in :mod:`omuscd.config`, so ``--help`` lists every one with its default.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import logging
import logging.handlers
import os
import shlex
import stat
import sys
from typing import Any

from omuscd import exitcodes
from omuscd.config import (
    DEFAULT_CONFIG_FILE,
    PARAM_BY_NAME,
    PARAMS,
    Config,
    ConfigError,
    autodetect,
    merge,
    read_secret,
    write_key,
)
from omuscd.version import PROTOCOL_VERSION, VERSION_STRING, __version__

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = exitcodes.OK, exitcodes.FAILURE, exitcodes.USAGE

DESCRIPTION = """\
omuscd joins the Linux machines of a LAN into one pool: every node sees every
other node's load. With no options it configures itself (interface, address,
ports, CPUs) and finds its peers by broadcast. Control it with
'telnet 127.0.0.1 4271' or 'omuscd ctl COMMAND'."""

EPILOG = f"""\
exit status: 0 clean shutdown; 1 runtime failure (port in use, already running);
2 usage or configuration error; 3 node id clash with an explicit --node-id;
4 the state directory is in use by another daemon (nothing in it was touched).
omuscd ctl: 0 success, 1 no connection, 4 request refused (4xx), 5 failed (5xx).
omuscd console: 0 quit, 1 no connection, 2 no terminal or usage error.

Settings may also come from a TOML file ({DEFAULT_CONFIG_FILE}, or --config),
keys named like the switches with '_' for '-'. Switches win over the file.
See omuscd(8), omuscd-commands(7) and omuscd.toml(5)."""


def _default_text(p: Any) -> str:
    if p.kind == "bool":
        return " (default: on)" if p.default else ""
    if p.default in (None, []):
        return ""
    return f" (default: {p.default})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omuscd", description=DESCRIPTION, epilog=EPILOG, allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version",
                        version=f"{VERSION_STRING} (wire protocol {PROTOCOL_VERSION}, "
                                f"python package {__version__})")
    parser.add_argument("-c", "--config", metavar="FILE",
                        help=f"configuration file (default: {DEFAULT_CONFIG_FILE} if it exists)")
    for p in PARAMS:
        flags = [p.short, p.switch] if p.short else [p.switch]
        kw: dict[str, Any] = {"dest": p.name, "default": argparse.SUPPRESS,
                              "help": p.help + _default_text(p)}
        if p.kind == "bool":
            # a switch that is on by default can be turned off: --no-balancing
            kw["action"] = argparse.BooleanOptionalAction if p.default else "store_true"
        else:
            if p.kind == "list":
                kw["action"] = "append"
            if p.choices:
                kw["choices"] = p.choices
            kw["metavar"] = p.metavar or ("SECONDS" if p.kind == "float" else
                                          "N" if p.kind == "int" else None)
            if kw["metavar"] is None:
                del kw["metavar"]
        parser.add_argument(*flags, **kw)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND",
                                title="commands (without one, the daemon runs)")
    keygen = sub.add_parser("keygen", help="write a new random cluster key (or control "
                            "password) to FILE with mode 0600; never overwrites")
    keygen.add_argument("file", metavar="FILE")
    ctl = sub.add_parser("ctl", help="send one control command to a daemon, print the reply",
                         description="Send one control command (see 'omuscd ctl help') and "
                         "print the reply without its codes. 'watch' streams until Ctrl-C.")
    ctl.add_argument("--connect", metavar="TARGET",
                     help="HOST[:PORT] or a Unix socket path (default: the local daemon's "
                          "socket if it exists, else 127.0.0.1:4271)")
    ctl.add_argument("--secret", metavar="FILE", help="control password file, when the "
                     "port asks for one")
    ctl.add_argument("--json", action="store_true", help="ask for the JSON form")
    ctl.add_argument("words", nargs=argparse.REMAINDER, metavar="COMMAND ...")
    console = sub.add_parser(
        "console", help="the urwid console of a running daemon, local or remote",
        description="Show the cluster (nodes, loads, jobs, events) and steer it with the "
        "control language. Keys: ':' command line, Tab next pane, Enter details, "
        "m migrate, k kill, b block, v view, ? help, q quit. See omuscd(8).")
    console.add_argument("target", nargs="?", metavar="HOST[:PORT]|SOCKET",
                         help="the daemon's control port or Unix socket (default: the local "
                              "daemon's socket if it exists, else 127.0.0.1:4271)")
    console.add_argument("--secret", metavar="FILE", help="control password file, when the "
                         "port asks for one (a port beyond loopback)")
    console.add_argument("--mono", action="store_true", help="no colours (also when "
                         "NO_COLOR is set)")
    console.add_argument("--refresh", metavar="SECONDS", type=float, default=1.0,
                         help="seconds between looks at the node table (default: 1.0; "
                              "the job table every 3 s or when an event says it changed)")
    from omuscd import runclient

    runclient.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("run", "attach"):
        from omuscd import runclient

        return runclient.dispatch(args)
    if args.command == "keygen":
        return keygen(args.file)
    if args.command == "ctl":
        return ctl(args)
    if args.command == "console":
        return console(args)
    return run_daemon(args)


def console(args: argparse.Namespace) -> int:
    if not 0.1 <= args.refresh <= 60:
        print("omuscd console: --refresh must be between 0.1 and 60 seconds", file=sys.stderr)
        return EXIT_USAGE
    from tui.main import console_main, need_terminal

    why = need_terminal("omuscd console")
    if why:
        print(f"omuscd console: {why}", file=sys.stderr)
        return EXIT_USAGE
    try:
        secret = read_secret(args.secret) if args.secret else None
        from omuscd.client import parse_target

        parse_target(args.target)
    except (ConfigError, ValueError) as e:
        print(f"omuscd console: {e}", file=sys.stderr)
        return EXIT_USAGE
    return console_main(args.target, secret, args.mono, args.refresh)


def keygen(path: str) -> int:
    try:
        write_key(path)
    except FileExistsError:
        print(f"omuscd keygen: {path} exists; not overwriting it", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as e:
        print(f"omuscd keygen: cannot write {path}: {e.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"wrote a new key to {path} (mode 0600); copy it to every node")
    return EXIT_OK


#: ctl commands that last as long as the moves they make: the daemon bounds each move
#: (its steps' own timeouts), the client waits for the answer however long that is
WAITS_FOR_MOVES = ("migrate", "expel", "bring", "checkpoint", "resume")


def ctl(args: argparse.Namespace) -> int:
    from omuscd.client import ProtocolError, connect

    words = [w for w in args.words if w != "--"] if args.words[:1] == ["--"] else args.words
    if not words:
        print("omuscd ctl: give a command, e.g. 'omuscd ctl status'", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        words = [*words, "--json"]
    line = " ".join(shlex.quote(w) for w in words)
    try:
        secret = read_secret(args.secret) if args.secret else None
        client = connect(args.connect, secret)
    except (ConfigError, ValueError) as e:
        print(f"omuscd ctl: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, PermissionError, ProtocolError) as e:
        where = args.connect or "the local daemon"
        print(f"omuscd ctl: cannot talk to {where}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        with client:
            if words[0].lower() == "watch":
                try:
                    for text in client.stream(line):
                        print(text, flush=True)
                except KeyboardInterrupt:
                    pass
                return EXIT_OK
            if words[0].lower() in WAITS_FOR_MOVES:
                client.wait_as_long_as_it_takes()
            # a move's progress on stderr: stdout stays the reply alone, as scripts read it
            reply = client.command(line, lambda text: print(text, file=sys.stderr,
                                                            flush=True))
    except (OSError, ConnectionError, ProtocolError) as e:
        print(f"omuscd ctl: {e}", file=sys.stderr)
        return EXIT_FAILURE
    print(reply.text, file=sys.stdout if reply.ok else sys.stderr)
    if reply.ok:
        return EXIT_OK
    return exitcodes.CTL_REFUSED if reply.code < 500 else exitcodes.CTL_FAILED


# --------------------------------------------------------------------------- daemon
def load_key(cfg: Config, explicit: bool) -> tuple[bytes | None, str]:
    """Decide the security mode: ``key``, ``read-only`` (no key) or ``insecure``."""
    if cfg.insecure:
        return None, "insecure"
    if os.path.exists(cfg.key_file):
        return read_secret(cfg.key_file), "key"
    if explicit:
        raise ConfigError(f"key file {cfg.key_file} does not exist; write one with "
                          f"'omuscd keygen {cfg.key_file}' and copy it to every node")
    return None, "read-only"


def setup_logging(cfg: Config) -> None:
    logger = logging.getLogger("omuscd")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.DEBUG if cfg.debug else logging.INFO)
    handler: logging.Handler
    if cfg.log_file:
        handler = logging.FileHandler(cfg.log_file)
        fmt = "%(asctime)s omuscd[%(process)d]: %(levelname)s: %(message)s"
    elif cfg.daemon and os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(
            "/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        fmt = "omuscd[%(process)d]: %(levelname)s: %(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        # journald stamps lines itself
        fmt = ("%(levelname)s: %(message)s" if os.environ.get("JOURNAL_STREAM")
               else "%(asctime)s omuscd[%(process)d]: %(levelname)s: %(message)s")
    handler.setFormatter(logging.Formatter(fmt))
    logger.addHandler(handler)


def _check_pidfile(path: str) -> None:
    try:
        with open(path) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return
    if pid > 0:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            pass
        raise RuntimeError(f"already running as pid {pid} (pid file {path})")


def _write_pidfile(path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


LOCK_FILE = "lock"


class StateDirInUse(Exception):
    """Another daemon holds the state directory's lock."""


def lock_state_dir(state_dir: str) -> int:
    """Take the state directory for this daemon: an exclusive flock on STATE_DIR/lock,
    held through the returned descriptor for the daemon's life (the kernel drops it when
    the process ends, however it ends).  Taken before anything in the directory is read,
    cleaned or written, so that a second daemon started on a directory in use leaves it
    alone (one once deleted the first daemon's images/).  The file is opened without
    following a link and is close-on-exec, so a job never inherits the lock."""
    os.makedirs(state_dir, mode=0o755, exist_ok=True)
    why = unsafe_state_dir(state_dir)
    if why is not None:
        raise OSError(errno.EPERM, f"{why}: another user could change what the daemon "
                      "keeps there (its lock, control socket, spool and CRIU images); give "
                      "it a directory of its own")
    path = os.path.join(state_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _lock_holder(fd)
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise StateDirInUse(f"state directory {state_dir} is in use by another daemon"
                                f"{holder} (lock {path}); give each daemon a --state-dir "
                                "of its own") from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def unsafe_state_dir(state_dir: str) -> str | None:
    """Why another account could change the state directory's contents, or None.

    Why: the daemon runs as root and CRIU restores what it finds in STATE_DIR/images; a
    directory a user made (``--state-dir /tmp/n2`` where they made /tmp/n2 first), or one
    inside a directory they may rename things in, would be theirs to fill.  The directory
    must be this daemon's and writable by it alone; every directory above it (as given,
    and after links) root's or the daemon's, and writable by no one else unless sticky."""
    me = os.geteuid()
    given = os.path.abspath(state_dir)
    for top in {given, os.path.realpath(given)}:
        st = os.stat(top)
        if st.st_uid != me or st.st_mode & 0o022:
            return (f"{top} belongs to uid {st.st_uid} (mode {st.st_mode & 0o777:o}), not "
                    f"to this daemon (uid {me}) alone")
        d = top
        while d != "/":
            d = os.path.dirname(d)
            st = os.stat(d)
            open_to_others = st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX
            if st.st_uid not in (0, me) or open_to_others:
                return (f"{d}, above it, belongs to uid {st.st_uid} (mode "
                        f"{st.st_mode & 0o7777:o})")
    return None


def _lock_holder(fd: int) -> str:
    """' (pid N)' from the lock file's content, for the message; '' if unreadable."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {text})" if text.isdigit() else ""


def _daemonize() -> int | None:
    """Double fork.  The original process waits on a pipe until the daemon says it is
    ready (or why it failed), so its exit status is the truth.  Returns the pipe's write
    end in the daemon; does not return in the original process."""
    r, w = os.pipe()
    if os.fork() > 0:
        os.close(w)
        chunks = []
        while chunk := os.read(r, 4096):
            chunks.append(chunk)
        msg = b"".join(chunks).decode(errors="replace")
        if msg.startswith("ok"):
            os._exit(EXIT_OK)
        code, _, text = msg.partition(" ")
        print(f"omuscd: {text or 'the daemon died during start-up'}", file=sys.stderr)
        os._exit(int(code) if code.isdigit() else EXIT_FAILURE)
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    os.umask(0o022)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    return w


def run_daemon(args: argparse.Namespace) -> int:
    import trio

    from omuscd.daemon import Daemon

    cli = {p.name: getattr(args, p.name) for p in PARAMS if hasattr(args, p.name)}
    try:
        cfg = merge(cli, args.config)
        autodetect(cfg)
        default_key = PARAM_BY_NAME["key_file"].default
        explicit_key = "key_file" in cli or cfg.values["key_file"] != default_key
        key, security = load_key(cfg, explicit_key)
        secret = read_secret(cfg.control_secret) if cfg.control_secret else None
    except ConfigError as e:
        print(f"omuscd: {e}", file=sys.stderr)
        return EXIT_USAGE
    if cfg.tui:
        from tui.main import need_terminal

        why = "--tui and --daemon exclude each other" if cfg.daemon else need_terminal("--tui")
        if why:
            print(f"omuscd: {why}", file=sys.stderr)
            return EXIT_USAGE
        if not cfg.log_file:  # the console owns the terminal
            cfg.values["log_file"] = os.path.join(cfg.state_dir, "omuscd.log")
        try:
            os.makedirs(cfg.state_dir, exist_ok=True)
        except OSError as e:
            print(f"omuscd: cannot create {e.filename}: {e.strerror}", file=sys.stderr)
            return EXIT_FAILURE
    ready_fd: int | None = None
    try:
        if cfg.daemon:
            _check_pidfile(cfg.pidfile)
    except RuntimeError as e:
        print(f"omuscd: {e}", file=sys.stderr)
        return EXIT_FAILURE
    if cfg.daemon:
        ready_fd = _daemonize()

    def report(code: int, text: str) -> None:
        if ready_fd is not None:
            os.write(ready_fd, f"{code} {text}".encode())
            os.close(ready_fd)

    # the lock first, in the process that lives on (after the forks of --daemon): before
    # the log file, the pid file or any clean-up can touch the directory
    try:
        state_lock = lock_state_dir(cfg.state_dir)
    except StateDirInUse as e:
        print(f"omuscd: {e}", file=sys.stderr)
        report(exitcodes.STATE_IN_USE, str(e))
        return exitcodes.STATE_IN_USE
    except OSError as e:
        print(f"omuscd: cannot lock the state directory {cfg.state_dir}: {e.strerror}",
              file=sys.stderr)
        report(EXIT_FAILURE, f"cannot lock the state directory {cfg.state_dir}: {e.strerror}")
        return EXIT_FAILURE
    setup_logging(cfg)
    log = logging.getLogger("omuscd")

    try:
        if cfg.daemon:
            _write_pidfile(cfg.pidfile)
    except OSError as e:
        log.error("cannot create %s: %s", e.filename, e.strerror)
        report(EXIT_FAILURE, f"cannot create {e.filename}: {e.strerror}")
        return EXIT_FAILURE

    daemon = Daemon(cfg, key, security, secret)
    if ready_fd is not None:
        daemon.on_ready = lambda: report(0, "ok")
    try:
        if cfg.tui:
            from tui.main import run_with_daemon

            code = trio.run(run_with_daemon, daemon, cfg.mono)
        else:
            code = trio.run(daemon.run)
    except* OSError as eg:
        err = eg.exceptions[0]
        log.error("%s", err)
        if cfg.tui:  # the log is a file now: say it where the user looks
            print(f"omuscd: {err}", file=sys.stderr)
        report(EXIT_FAILURE, str(err))
        code = EXIT_FAILURE
    finally:
        if cfg.daemon:
            try:
                os.unlink(cfg.pidfile)
            except OSError:
                pass
        os.close(state_lock)  # the last thing: the directory is free for the next daemon
    return code
