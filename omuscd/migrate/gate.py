"""A post-copy target's ``criu lazy-pages`` started before the freeze, held at its first image.

``criu lazy-pages`` reads the inventory, the process tree and each process's namespace ids
(criu/pstree.c, prepare_dummy_pstree) as it starts, and only then says it is ready; the
restore cannot begin before.  Started once those images had come, in the job's freeze, its
start (exec through its loader, the kernel's features read from their cache: ~6 ms alone
here, two to three times that beside this daemon taking in the images on the same CPU) was
most of what the freeze waited for after the images (bench_migrate's "target lazy-pages
ready": 7 ms of a 16 MB job's 62 ms freeze).

So the target makes ``inventory.img``, the first image lazy-pages opens, a FIFO that it
holds open for reading and writing, and starts lazy-pages before the job is frozen: it
starts meanwhile and then waits in its read of the inventory. When the images it reads
first are all here (the source's 'lazy-start'), :meth:`InventoryGate.release` puts the
real inventory in the FIFO's place (the restore reads that file later), then writes the
same bytes into the FIFO: lazy-pages reads them and, once we close our end, an end of
file, and goes on to the process tree, there by then. The place is taken before the FIFO
is written, so a lazy-pages that opens the inventory only now gets the file; one already
reading gets the FIFO's bytes. Either way it reads what the source dumped.

Our end stays open until lazy-pages has read those bytes (:meth:`InventoryGate.settle`:
the pipe is empty) or is ready (it read the file): it reads to an end of file, which our
closing gives it; closed at once, a lazy-pages that had found the FIFO by its name just
before it was replaced, and opened it just after, would wait for a writer for ever.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
import termios
from pathlib import Path

INVENTORY = "inventory.img"
#: A pipe takes this much without a reader before a write blocks (Linux: 16 pages); an
#: inventory is a few hundred bytes.
PIPE_ROOM = 65536


class GateError(OSError):
    """The inventory cannot pass the gate (a move fails with this reason)."""


class InventoryGate:
    """``images/inventory.img`` as a FIFO held open here until :meth:`release`."""

    def __init__(self, images: Path):
        self.images = images
        self.path = images / INVENTORY
        self.data: bytes | None = None  # the inventory, once it came
        self.released = False
        os.mkfifo(self.path, 0o600)
        try:
            # read-write: opening never blocks, and the FIFO has a writer until we close
            self.fd: int | None = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC
                                          | os.O_NOFOLLOW)
        except OSError:
            os.unlink(self.path)
            raise

    @property
    def open(self) -> bool:
        return self.fd is not None

    @staticmethod
    def room(size: object) -> int:
        """The announced size of the inventory, if it may pass (GateError if not)."""
        if type(size) is not int or not 0 < size < PIPE_ROOM:
            raise GateError(f"{INVENTORY} of {size!r} bytes cannot pass to lazy-pages")
        return size

    def hold(self, data: bytes) -> None:
        """The inventory came; it waits for :meth:`release`."""
        if len(data) >= PIPE_ROOM:
            raise GateError(f"{INVENTORY} of {len(data)} bytes is too large")
        self.data = data

    def release(self) -> None:
        """The real inventory in the FIFO's place, then its bytes into the FIFO (our end
        closed by :meth:`settle` once they are read, or by :meth:`close`)."""
        if self.fd is None or self.released:
            return
        if self.data is None:
            raise GateError(f"{INVENTORY} did not come before the images lazy-pages reads")
        part = self.images / (INVENTORY + ".part")
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.data)
        os.replace(part, self.path)
        self.released = True
        if os.write(self.fd, self.data) != len(self.data):  # within PIPE_ROOM: all or none
            raise GateError(f"{INVENTORY}: short write to lazy-pages")

    def settle(self) -> bool:
        """Close our end once released and read (lazy-pages then reads an end of file).
        Whether it is still open (to be called again)."""
        if self.fd is not None and self.released and _unread(self.fd) == 0:
            self.close()
        return self.fd is not None

    def close(self) -> None:
        """Our end closed: settled, lazy-pages ready (it read the file), or the move ended
        (lazy-pages, if reading, is killed by the move's own cleanup); the FIFO's name
        removed unless the file took it."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        os.close(fd)
        try:
            if stat.S_ISFIFO(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except FileNotFoundError:
            pass


def _unread(fd: int) -> int:
    """Bytes in the pipe open on ``fd`` that nobody has read yet."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
