"""CRIU started ahead of a job's freeze: ``criu swrk``, CRIU's service worker, given one
request (a dump, or a restore) on a socket once the job is frozen.

Why: a CRIU run starts a process, and that start (here: a shell wrapper, the dynamic
loader and CRIU's libraries) took 12 ms of the job's frozen time, twice a move (the dump
on the source, the restore on the target), against a bare ``criu dump`` and ``criu
restore`` of 25 ms each for a 16 MB job. A worker started before the freeze waits on its
socket; the request starts the work at once. The options are those of the command line
(criu/cr-service.c: leave_stopped, file_locks, the page server's socket, rst_sibling,
inherit_fd, lazy_pages; notify_scripts, so that a restore asks before each step); the
descriptors they name (the page server's socket, the files a restored job inherits) are
the worker's own, passed when it starts. Its images directory is given as a descriptor
of this daemon's, which CRIU opens through /proc.

The messages are CRIU's rpc.proto (criu_req, criu_resp), encoded here: the few fields
used, with no protobuf library.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from omuscd import rootexec
from omuscd.migrate import MoveError

DUMP = 1  # criu_req_type
RESTORE = 2
NOTIFY = 6
#: The notification that names the restored tree's root (criu/cr-service.c,
#: send_criu_rpc_script): sent once the root exists in its namespaces, before CRIU
#: restores its files (and takes its file locks) or its memory.
SETUP_NS = "setup-namespaces"
POST_RESTORE = "post-restore"
#: The largest deleted-but-open file a dump carries (CRIU's default is 1 MB): sqlite3 and
#: sort keep temporary files of tens of MB open after unlinking them, and a move of such a
#: job failed ("Can't dump ghost file ... increase limit").  Its content travels inside the
#: freeze, like the job's other images.
GHOST_LIMIT = 512 << 20
#: criu_opts field numbers (images/rpc.proto)
_IMAGES_DIR_FD, _PID, _LEAVE_RUNNING, _FILE_LOCKS = 1, 2, 3, 8
_LOG_LEVEL, _LOG_FILE, _PS, _GHOST_LIMIT = 9, 10, 11, 35
_RST_SIBLING, _INHERIT_FD, _LAZY_PAGES, _LEAVE_STOPPED = 26, 27, 48, 69
_NOTIFY_SCRIPTS = 12
_NOTIFY_SUCCESS = 3  # criu_req
_PS_FD = 4  # criu_page_server_info.fd
_MAX_RESPONSE = 1 << 16


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative numbers as protobuf encodes an int32: ten bytes
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, value: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(value)) + value


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("a truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def decode(buf: bytes) -> dict[int, list[int | bytes]]:
    """The fields of one protobuf message: numbers (varints) and bytes (nested messages
    and strings); fixed-size fields are skipped."""
    out: dict[int, list[int | bytes]] = {}
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        field, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, i = _read_varint(buf, i)
        elif wire == 2:
            size, i = _read_varint(buf, i)
            if i + size > len(buf):
                raise ValueError("a truncated field")
            value, i = buf[i:i + size], i + size
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
            continue
        else:
            raise ValueError(f"wire type {wire}")
        out.setdefault(field, []).append(value)
    return out


def dump_options(init_pid: int, images_fd: int, log: str, pages: int | None,
                 running: bool = False) -> bytes:
    """``criu dump -t PID --leave-stopped --file-locks --ghost-limit GHOST_LIMIT -v2 -o LOG``
    (``--leave-running`` instead for a checkpoint; and ``--page-server --ps-socket PAGES``)."""
    opts = (_int(_IMAGES_DIR_FD, images_fd) + _int(_PID, init_pid) + _int(_FILE_LOCKS, 1)
            + _int(_LOG_LEVEL, 2) + _bytes(_LOG_FILE, log.encode())
            + _int(_LEAVE_RUNNING if running else _LEAVE_STOPPED, 1)
            + _int(_GHOST_LIMIT, GHOST_LIMIT))
    if pages is not None:
        opts += _bytes(_PS, _int(_PS_FD, pages))
    return opts


def restore_options(images_fd: int, log: str, inherit: list[tuple[str, int]],
                    lazy: bool, notify: bool = False) -> bytes:
    """``criu restore --restore-detached --restore-sibling --leave-stopped --file-locks
    -v2 -o LOG --inherit-fd fd[N]:KEY...`` (and ``--lazy-pages``; with ``notify``, CRIU
    asks before each step, as it runs action scripts: see :meth:`Worker.call`)."""
    opts = (_int(_IMAGES_DIR_FD, images_fd) + _int(_FILE_LOCKS, 1) + _int(_LOG_LEVEL, 2)
            + _bytes(_LOG_FILE, log.encode()) + _int(_RST_SIBLING, 1)
            + _int(_LEAVE_STOPPED, 1))
    if notify:
        opts += _int(_NOTIFY_SCRIPTS, 1)
    for key, fd in inherit:
        opts += _bytes(_INHERIT_FD, _bytes(1, key.encode()) + _int(2, fd))
    if lazy:
        opts += _int(_LAZY_PAGES, 1)
    return opts


def request(kind: int, opts: bytes) -> bytes:
    return _int(1, kind) + _bytes(2, opts)


class Response:
    """criu_resp: whether it worked, the restored init's pid, CRIU's error message; or a
    notification (``script``: its name, with the root's pid for some)."""

    def __init__(self, data: bytes):
        f = decode(data)
        self.type = f.get(1, [0])[0]
        self.script = ""
        self.notified_pid: int | None = None
        note = f.get(5, [b""])[0]
        if self.type == NOTIFY and isinstance(note, bytes):
            n = decode(note)
            name = n.get(1, [b""])[0]
            self.script = name.decode(errors="replace") if isinstance(name, bytes) else ""
            pid = n.get(2, [None])[0]
            self.notified_pid = pid if isinstance(pid, int) and pid > 0 else None
        self.success = f.get(2, [0])[0] == 1
        restore = f.get(4, [b""])[0]
        pids = decode(restore).get(1, []) if isinstance(restore, bytes) else []
        self.pid = int(pids[0]) if pids and isinstance(pids[0], int) else None
        msg = f.get(9, [b""])[0]
        self.error = msg.decode(errors="replace") if isinstance(msg, bytes) else ""


class Worker:
    """One ``criu swrk``, started and waiting for its one request."""

    def __init__(self, proc: trio.Process, sock: trio.socket.SocketType, said: Path):
        self.proc = proc
        self.sock = sock
        self.said = said  # what it printed, should it fail before logging
        self.cpus: set[int] | None = None  # where it is to run, if not anywhere

    @classmethod
    async def start(cls, criu: str, prefix: tuple[str, ...], pass_fds: tuple[int, ...],
                    said: Path, umask: int) -> Worker:
        """Start ``criu swrk`` (after ``prefix``, a command that execs it) holding
        ``pass_fds`` (at the same numbers); it waits for a request."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with open(said, "wb", opener=lambda p, f: os.open(p, f, 0o600)) as out:
                # restore_signals=False: CRIU keeps this daemon's SIGPIPE ignored (see
                # Criu._criu); vfork, not fork: nothing runs in the child before exec
                proc = await trio.lowlevel.open_process(
                    [*prefix, criu, "swrk", str(theirs.fileno())], stdin=subprocess.DEVNULL,
                    stdout=out, stderr=subprocess.STDOUT,
                    pass_fds=(theirs.fileno(), *pass_fds), restore_signals=False,
                    env=rootexec.HELPER_ENV, umask=umask)
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        return cls(proc, trio.socket.from_stdlib_socket(mine), said)

    async def call(self, kind: int, opts: bytes, limit: float,
                   notified: Callable[[Response], Awaitable[None]] | None = None
                   ) -> Response | None:
        """Send the request and wait (at most ``limit`` seconds) for CRIU's answer; None
        if it ended without one (it was killed, or failed before answering); then wait
        for it to end.  MoveError after ``limit`` (it is killed).  A request made with
        notifications (restore_options' ``notify``) has each given to ``notified`` and
        then answered "go on": CRIU waits for that answer, and fails the restore, killing
        what it restored, if it cannot have it (this daemon died meanwhile).  If
        ``notified`` raises, CRIU is answered "stop" (it fails the restore the same way)
        and the error is raised once it has ended."""
        data = b""
        refused: Exception | None = None
        try:
            with trio.move_on_after(limit) as bound:
                try:
                    await self.sock.send(request(kind, opts))
                    while True:
                        data = await self.sock.recv(_MAX_RESPONSE)
                        note = _notification(data)
                        if note is None:
                            break
                        if notified is not None and refused is None:
                            try:
                                await notified(note)
                            except Exception as e:  # raised once CRIU has ended
                                refused = e
                        await self.sock.send(_int(1, NOTIFY) +
                                             _int(_NOTIFY_SUCCESS, 0 if refused else 1))
                except OSError:
                    data = b""
        except BaseException:  # cancelled: SIGKILL at once (a stopped CRIU would sit on a
            await self.close()  # SIGTERM; the tasks it froze go on when their tracer goes)
            raise
        if bound.cancelled_caught:
            await self.close()
            raise MoveError(f"took more than {limit:.0f}s: stopped")
        await self.close(grace=5.0)
        if refused is not None:
            raise refused
        try:
            return Response(data) if data else None
        except ValueError:
            return None

    def said_last(self) -> str:
        """The last thing it printed (before its log was open), or ''."""
        try:
            lines = self.said.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1][:300] if lines else ""

    async def close(self, grace: float = 0.0) -> None:
        """Let it end (within ``grace`` seconds), else kill it; collect it either way."""
        self.sock.close()
        with trio.CancelScope(shield=True):
            with trio.move_on_after(grace):
                await self.proc.wait()
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()


def _notification(data: bytes) -> Response | None:
    """``data`` as a notification, or None (the answer, or nothing readable)."""
    try:
        r = Response(data) if data else None
    except ValueError:
        return None
    return r if r is not None and r.type == NOTIFY else None


def open_dir(images: Path) -> int:
    """A descriptor of the images directory for CRIU to open (through /proc)."""
    return os.open(images, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)

