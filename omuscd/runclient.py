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
from typing import Any

from omuscd.client import ControlClient, ProtocolError
from omuscd.config import default_state_dir

FRAME = struct.Struct(">BI")
FRAME_STDOUT, FRAME_STDERR, FRAME_END, FRAME_SIGNAL = 1, 2, 3, 6
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

#: Exit statuses of omuscd run/attach besides the job's own (omuscd(8), EXIT STATUS).
EXIT_LOST = 124  # the node running the job died: the job is lost
EXIT_NOT_STARTED = 125  # the job could not be started (no such program, no node, refused)
EXIT_DAEMON = 123  # the local daemon could not be reached or went away


def _connect(target: str | None) -> ControlClient:
    path = target or os.path.join(default_state_dir(), "control.sock")
    if not os.path.exists(path):
        system = "/var/lib/omuscd/control.sock"
        if target is None and os.path.exists(system):
            path = system
    return ControlClient.unix(path, timeout=None)  # type: ignore[arg-type]


def run(argv: list[str], placement: list[str], detach: bool, target: str | None,
        user: str | None = None) -> int:
    env = base64.b64encode(json.dumps(dict(os.environ)).encode()).decode()
    words = ["run", *placement, "--cwd", os.getcwd(), "--env", env, "--json"]
    if user:
        words += ["--user", user]
    line = " ".join(shlex.quote(w) for w in [*words, "--", *argv])
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
    return _attach(client, doc["job"], follow=False)


def attach(job: str, follow: bool, target: str | None) -> int:
    try:
        client = _connect(target)
    except (OSError, ConnectionError, ProtocolError) as e:
        print(f"omuscd attach: cannot reach the local daemon: {e}", file=sys.stderr)
        return EXIT_DAEMON
    return _attach(client, job, follow)


def _attach(client: ControlClient, job: str, follow: bool) -> int:
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

    def forward(signum: int, frame: Any) -> None:
        try:
            sock.sendall(FRAME.pack(FRAME_SIGNAL, 1) + bytes([signum]))
        except OSError:
            pass

    for s in FORWARDED:
        signal.signal(s, forward)
    out = {FRAME_STDOUT: sys.stdout.buffer, FRAME_STDERR: sys.stderr.buffer}
    try:
        while True:
            kind, length = FRAME.unpack(client.read_exactly(FRAME.size))
            payload = client.read_exactly(length)
            if kind in out:
                out[kind].write(payload)
                out[kind].flush()
            elif kind == FRAME_END:
                end = json.loads(payload)
                if end["state"] == "lost":
                    print(f"omuscd: {end['text']}", file=sys.stderr)
                    return EXIT_LOST
                if end.get("exit") and "error" in end["exit"]:
                    print(f"omuscd: job {end['job']} on {end['node']}: {end['text']}",
                          file=sys.stderr)
                return int(end["status"])
    except (OSError, ConnectionError, ValueError, struct.error) as e:
        print(f"omuscd: lost the local daemon ({e}); the job runs on: 'omuscd attach {job}'",
              file=sys.stderr)
        return EXIT_DAEMON
    finally:
        for s in FORWARDED:
            signal.signal(s, signal.SIG_DFL)
