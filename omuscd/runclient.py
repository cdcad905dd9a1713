"""``omuscd run`` and ``omuscd attach``: a job that runs anywhere but looks local.

The client talks to the local daemon over its Unix socket (the kernel tells the daemon who
we are), asks it to ``run`` the command with our working directory and environment, then
``attach``es in binary mode: the job's stdout and stderr arrive as frames and are written
to ours; Ctrl-C, SIGTERM and SIGHUP are forwarded to the job wherever it runs; the exit
status is the job's (128+N when signal N killed it).  Only the standard library is
imported here, so a short job does not pay for the daemon's imports.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import signal
import struct
import sys

from omuscd.client import ControlClient, ProtocolError
from omuscd.paths import default_socket

# For the annotations only.  Neither typing nor threading (only --stdin needs a thread) is
# imported at run time: the client's start took 33 ms of CPU with them, 27 without, and a
# batch of clients started at once delays its first job by that much per client.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

FRAME = struct.Struct(">BI")
FRAME_STDOUT, FRAME_STDERR, FRAME_END, FRAME_NOTICE, FRAME_SIGNAL = 1, 2, 3, 4, 6
FRAME_STDIN, FRAME_STDIN_EOF = 7, 8
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

#: Exit statuses of omuscd run/attach besides the job's own (omuscd(8), EXIT STATUS).
EXIT_LOST = 124  # the node running the job died: the job is lost
EXIT_NOT_STARTED = 125  # the job could not be started (no such program, no node, refused)
EXIT_DAEMON = 123  # the local daemon could not be reached or went away
EXIT_OUTPUT_CUT = 122  # the job ended but its output is incomplete (a full state filesystem)


def _connect(target: str | None) -> ControlClient:
    return ControlClient.unix(target or default_socket(), timeout=None)  # type: ignore[arg-type]


RUN_DESCRIPTION = (
    "Run CMD on the node with the most room (or as placed), with your working directory, "
    "environment, user and groups; print its output as it comes, forward Ctrl-C, SIGTERM "
    "and SIGHUP to it, and exit with its status (128+N if signal N killed it; 124 if its "
    "node died with no checkpoint to go back to; 125 if it could not start; 123 if the local "
    "daemon went away or the job was checkpointed and ended; 122 if its "
    "output is incomplete because a state filesystem is full). omuscd "
    "assumes the same paths on every node.")


def add_parsers(sub: Any) -> None:
    """The ``run`` and ``attach`` subcommands: defined once, used by the full command line
    and by the fast path in :func:`main`."""
    import argparse

    run = sub.add_parser("run", help="run a command where the cluster has room; it looks "
                         "local", description=RUN_DESCRIPTION)
    where = run.add_mutually_exclusive_group()
    where.add_argument("--best", action="store_true",
                       help="the node with the most spare capacity (default)")
    where.add_argument("--home", action="store_true", help="this node")
    where.add_argument("--node", metavar="ID|NAME", help="that node")
    where.add_argument("--among", metavar="LIST", help="the best of these nodes "
                       "(comma-separated ids or names)")
    run.add_argument("--stay", action="store_true", help="never migrate this job")
    run.add_argument("--restartable", action="store_true",
                     help="the job may be killed and rerun from the start elsewhere")
    run.add_argument("--detach", action="store_true",
                     help="print the job id and return; see 'omuscd attach'")
    run.add_argument("--checkpoint-every", metavar="DURATION",
                     help="take a checkpoint of the job this often (30s, 10m, 1h30m): "
                          "if the node running it dies, it goes on from the last one")
    run.add_argument("--stdin", action="store_true",
                     help="give the job this command's standard input (default: /dev/null); "
                     "such a job cannot migrate")
    run.add_argument("--user", metavar="USER", help="run as USER (root only)")
    run.add_argument("--connect", metavar="SOCKET",
                     help="the local daemon's Unix socket (default: STATE_DIR/control.sock)")
    run.add_argument("command_argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    att = sub.add_parser("attach", help="reattach to a job started here: its output, "
                         "signals and exit status")
    att.add_argument("--follow", action="store_true",
                     help="output from now on (default: from the start)")
    att.add_argument("--connect", metavar="SOCKET",
                     help="the local daemon's Unix socket (default: STATE_DIR/control.sock)")
    att.add_argument("job", metavar="JOB")


def main(argv: list[str]) -> int:
    """``omuscd run|attach ...`` without the daemon's imports."""
    import argparse

    parser = argparse.ArgumentParser(prog="omuscd", allow_abbrev=False)
    add_parsers(parser.add_subparsers(dest="command", required=True))
    return dispatch(parser.parse_args(argv))


def dispatch(args: Any) -> int:
    if args.command == "attach":
        return attach(args.job, args.follow, args.connect)
    argv = args.command_argv
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("omuscd run: give a command after '--'", file=sys.stderr)
        return 2
    placement = [f"--{k}" for k in ("best", "home", "stay", "restartable") if getattr(args, k)]
    for k in ("node", "among"):
        if getattr(args, k):
            placement += [f"--{k}", getattr(args, k)]
    if args.checkpoint_every is not None:
        from omuscd import duration

        try:
            duration.parse(args.checkpoint_every)
        except ValueError as e:
            print(f"omuscd run: --checkpoint-every: {e}", file=sys.stderr)
            return 2
        placement += ["--checkpoint-every", args.checkpoint_every]
    if args.stdin and args.detach:
        print("omuscd run: --stdin needs an attached client, not --detach", file=sys.stderr)
        return 2
    return run(argv, placement, args.detach, args.connect, args.user, args.stdin)


def run(argv: list[str], placement: list[str], detach: bool, target: str | None,
        user: str | None = None, stdin: bool = False) -> int:
    try:
        cwd = os.getcwd()
    except OSError as e:
        print(f"omuscd run: the current directory is gone ({e.strerror})", file=sys.stderr)
        return EXIT_NOT_STARTED
    env = base64.b64encode(json.dumps(dict(os.environ)).encode()).decode()
    # argv travels encoded: a word may hold a newline, which would end the command line
    coded = base64.b64encode(json.dumps(argv).encode()).decode()
    words = ["run", *placement, "--cwd", cwd, "--env", env, "--argv", coded, "--json"]
    if user:
        words += ["--user", user]
    if stdin:
        words.append("--stdin")
    line = " ".join(shlex.quote(w) for w in words)
    # a Ctrl-C while the job starts is the job's too: without this it killed this client
    # alone, and the job it had just started ran on, detached
    held = [] if detach else _hold_signals()
    try:
        client = _connect(target)
        reply = client.command(line)
    except (OSError, ConnectionError, ProtocolError) as e:
        print(f"omuscd run: cannot reach the local daemon: {e}", file=sys.stderr)
        return EXIT_DAEMON
    if not reply.ok:
        print(f"omuscd run: {reply.text}", file=sys.stderr)
        return EXIT_NOT_STARTED
    doc = reply.json()
    if detach:
        print(doc["job"])
        client.close()
        return 0
    return _attach(client, doc["job"], follow=False, stdin=stdin, held=held)


def _hold_signals() -> list[int]:
    """Until the client is attached, note the signals it is to forward; they are sent on
    to the job as soon as it is.  The same signal twice (a daemon that does not answer)
    ends this client as it would have without us."""
    held: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        if signum in held:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        held.append(signum)

    for s in FORWARDED:
        signal.signal(s, hold)
    return held


def attach(job: str, follow: bool, target: str | None) -> int:
    try:
        client = _connect(target)
    except (OSError, ConnectionError, ProtocolError) as e:
        print(f"omuscd attach: cannot reach the local daemon: {e}", file=sys.stderr)
        return EXIT_DAEMON
    return _attach(client, job, follow)


def _attach(client: ControlClient, job: str, follow: bool, stdin: bool = False,
            held: list[int] | None = None) -> int:
    try:
        reply = client.command(f"attach {shlex.quote(job)} --binary"
                               + (" --follow" if follow else ""))
    except (OSError, ConnectionError, ProtocolError) as e:
        print(f"omuscd: lost the local daemon: {e}", file=sys.stderr)
        return EXIT_DAEMON
    if reply.code != 250:
        print(f"omuscd: {reply.text}", file=sys.stderr)
        return EXIT_NOT_STARTED
    sock = client.sock
    sock.settimeout(None)
    sending = None
    if stdin:
        import threading

        sending = threading.Lock()  # the input thread and the signal handler share the socket

    def send(frame: bytes) -> None:
        if sending is None:
            sock.sendall(frame)
            return
        with sending:
            sock.sendall(frame)

    def forward(signum: int, frame: Any) -> None:
        try:
            send(FRAME.pack(FRAME_SIGNAL, 1) + bytes([signum]))
        except OSError:
            pass

    def feed() -> None:  # --stdin: our input becomes the job's, in a thread of its own
        try:
            while data := os.read(0, 65536):
                send(FRAME.pack(FRAME_STDIN, len(data)) + data)
            send(FRAME.pack(FRAME_STDIN_EOF, 0))
        except OSError:
            pass

    for s in FORWARDED:
        signal.signal(s, forward)
    for signum in held or ():
        forward(signum, None)
    if stdin:
        threading.Thread(target=feed, daemon=True).start()
    out = {FRAME_STDOUT: sys.stdout.buffer, FRAME_STDERR: sys.stderr.buffer}
    try:
        while True:
            kind, length = FRAME.unpack(client.read_exactly(FRAME.size))
            payload = client.read_exactly(length)
            if kind in out:
                out[kind].write(payload)
                out[kind].flush()
            elif kind == FRAME_NOTICE:  # e.g. the job went back to its checkpoint
                sys.stdout.flush()
                print(f"omuscd: {payload.decode(errors='replace')}", file=sys.stderr,
                      flush=True)
            elif kind == FRAME_END:
                end = json.loads(payload)
                if end["state"] == "lost":
                    print(f"omuscd: {end['text']}", file=sys.stderr)
                    return EXIT_LOST
                if end["state"] == "checkpointed":  # checkpoint --exit: resumable
                    print(f"omuscd: {end['text']}", file=sys.stderr)
                    return EXIT_DAEMON  # not its end: attach again once resumed
                if end.get("exit") and "error" in end["exit"]:
                    print(f"omuscd: job {end['job']} on {end['node']}: {end['text']}",
                          file=sys.stderr)
                cut = (end.get("exit") or {}).get("cut")
                if cut:  # never silently: say so, and exit with a status of our own
                    print(f"omuscd: job {end['job']}: output incomplete: {cut} (the job "
                          f"itself: {end['text'] or end['state']})", file=sys.stderr)
                    return EXIT_OUTPUT_CUT
                return int(end["status"])
    except (OSError, ConnectionError, ValueError, struct.error) as e:
        print(f"omuscd: lost the local daemon ({e}); the job runs on: 'omuscd attach {job}'",
              file=sys.stderr)
        return EXIT_DAEMON
    finally:
        for s in FORWARDED:
            signal.signal(s, signal.SIG_DFL)
