"""Entry points: ``omuscd console [TARGET]`` and ``omuscd --tui``."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING

import trio

from tui.app import Console
from tui.link import Connector, Link, LinkError, connector, describe
from tui.source import ClusterSource, Model

if TYPE_CHECKING:
    from typing import Protocol

    from omuscd.control.server import ControlServer

    class Daemon(Protocol):
        """The daemon as the in-process console uses it (omuscd.daemon is imported by
        omuscd.cli alone)."""

        control: ControlServer
        hangup_stops: bool

        async def run(self, task_status: trio.TaskStatus[None] = ...) -> int: ...

        def request_shutdown(self, reason: str) -> None: ...

log = logging.getLogger("omuscd")


def need_terminal(what: str) -> str | None:
    """Why ``what`` cannot run here, or None: the console needs a terminal both ways."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return f"{what} needs a terminal (stdin and stdout are not one)"
    return None


class FeedHandler(logging.Handler):
    """Warnings and errors of the daemon's log, shown in the console's feed (the log
    itself goes to a file while the console owns the terminal)."""

    def __init__(self, model: Model):
        super().__init__(logging.WARNING)
        self.model = model

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.model.note(record.levelname.lower(), record.getMessage())
        except Exception:  # logging must never raise into the daemon
            self.handleError(record)


async def _until_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP, signal.SIGINT) as sigs:
        async for _ in sigs:
            scope.cancel()
            return


def console_main(target: str | None, secret: bytes | None, mono: bool,
                 refresh: float) -> int:
    """``omuscd console``: 0 when the user quits, 1 when the daemon cannot be reached."""
    connect = connector(target, secret)
    where = "via " + describe(target)

    async def main() -> int:
        try:
            first = await connect()
        except LinkError as e:
            print(f"omuscd console: {e}", file=sys.stderr)
            return 1
        await first.aclose()
        source = ClusterSource(connect, refresh=refresh)
        console = Console(source, where, mono=mono)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_until_signal, nursery.cancel_scope)
            await console.run()
            nursery.cancel_scope.cancel()
        return 0

    return trio.run(main)


def in_process(daemon: Daemon, nursery: trio.Nursery) -> Connector:
    """Sessions into this process's own control server, through a socket pair: the
    console gets exactly what a local ``telnet`` or ``omuscd ctl`` gets, as this user."""

    async def connect() -> Link:
        mine, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        nursery.start_soon(daemon.control.handle_unix, trio.SocketStream(theirs))
        link = Link(trio.SocketStream(mine))
        await link.greet(None)
        return link
    return connect


async def run_with_daemon(daemon: Daemon, mono: bool) -> int:
    """``omuscd --tui``: the daemon and its console in one trio run.  Quitting asks
    whether to stop the daemon; a daemon stopped by a signal or 'shutdown' ends the
    console too.  Returns the daemon's exit code."""
    code = 0
    logger = logging.getLogger("omuscd")
    async with trio.open_nursery() as nursery:
        async def daemon_task(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                              ) -> None:
            nonlocal code
            code = await daemon.run(task_status=task_status)
            nursery.cancel_scope.cancel()

        daemon.hangup_stops = True
        await nursery.start(daemon_task)
        source = ClusterSource(in_process(daemon, nursery), refresh=1.0)
        feed = FeedHandler(source.model)
        logger.addHandler(feed)
        console = Console(source, "", mono=mono, in_daemon=True)
        try:
            await console.run()
        finally:
            logger.removeHandler(feed)
        daemon.hangup_stops = False
        if console.quit_choice == "leave":
            print(f"omuscd: console closed; the daemon runs on as pid {os.getpid()} "
                  f"(stop it with SIGTERM or 'omuscd ctl shutdown')", flush=True)
        else:
            daemon.request_shutdown("quit from the console")
    return code
