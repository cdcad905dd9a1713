"""One CRIU dump at a time on a machine.

A job lives in a PID namespace of its own, so CRIU's parasite, running inside the job's
first task, mounts a /proc of that namespace at ``proc.crtools`` in the task's working
directory (criu/pie/parasite.c: get_proc_fd), which for every job's init is "/".  Two
dumps at once (two moves, a move and a checkpoint, or two daemons of a test cluster on one
machine) race for that one name: the second fails with "Can't create a directory (-17)",
and its move or checkpoint fails.  Dumps are short, so they take turns instead: a lock of
this daemon's, and a lock file every daemon on the machine shares (``flock``, released by
the kernel if the daemon dies).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import AsyncIterator
from pathlib import Path

import trio

LOCK_FILE = Path("/run/omuscd-criu-dump.lock")
POLL = 0.005  # seconds between tries for the machine's lock (dumps take 0.05 s and more)


class DumpLock:
    """Taken around every CRIU dump of this daemon (see the module's docstring)."""

    def __init__(self, path: Path = LOCK_FILE):
        self.path = path
        self.mine = trio.Lock()

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        async with self.mine:
            fd = self._open()
            try:
                if fd is not None:
                    while not _try_lock(fd):
                        await trio.sleep(POLL)
                yield
            finally:
                if fd is not None:
                    os.close(fd)  # releases the flock

    def _open(self) -> int | None:
        """The machine's lock file: root's, never through a link; None where it cannot
        be had (this daemon's own lock still holds)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600)
        except OSError:
            return None
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or not (st.st_mode & 0o170000 == 0o100000):
            os.close(fd)
            return None
        return fd


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        return True  # a filesystem without flock: this daemon's lock alone
