"""A moved job's memory, served on demand from its dump's images (post-copy).

Why this exists: with post-copy the job is frozen only while CRIU dumps it locally and the
small images travel; the target restores it with ``criu restore --lazy-pages`` and its
memory follows while it runs, fetched by ``criu lazy-pages`` when it faults or in the
background.  That puts the freeze of a big job under a bare dump plus restore (issue 4's
target).  CRIU's own side of that, ``criu dump --lazy-pages`` or ``criu page-server
--lazy-pages``, fails on current kernels ("page-pipe: tee: 65536: Operation not
supported", CRIU issue 3056: tee of pipe buffers is refused), so the source daemon answers
the target's lazy-pages daemon itself, from the pages image of an ordinary dump.

The protocol is CRIU's page-server protocol (criu/page-xfer.c), the small part that
``criu lazy-pages --page-server`` speaks: it asks for pages with ``PS_IOV_GET`` (one
request header: command, pages, address, the process's id in the images) and gets back the
same header as ``PS_IOV_ADD_F`` with the number of pages sent, which may be fewer than
asked for, followed by the pages; it ends with ``PS_IOV_FORCE_CLOSE`` (CRIU was given a
socket, not a port), answered by a 32-bit status 0.

The images say which pages the restore reads itself (present, not lazy: the few that
cannot be restored lazily) and which it leaves to the lazy-pages daemon: :class:`PageMap`.
"""

from __future__ import annotations

import bisect
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from omuscd.migrate import MoveError

PAGE = os.sysconf("SC_PAGE_SIZE")
#: CRIU's struct page_server_iov in criu 4.x: u32 cmd, u32 nr_pages, u64 vaddr, u64 dst_id
REQUEST = struct.Struct("<IIQQ")
PS_IOV_ADD_F = 6
PS_IOV_GET = 7
PS_IOV_CLOSE = 0x1023
PS_IOV_FORCE_CLOSE = 0x1024
PS_CMD_BITS = 16
PE_LAZY = 1 << 1
PE_PRESENT = 1 << 2
IMG_COMMON_MAGIC = 0x54564319
PAGEMAP_MAGIC = 0x56084025
#: the answer to the daemon's last word: status 0
END = struct.pack("<i", 0)
#: the most pages one answer carries (the lazy-pages daemon asks for at most this, too)
MAX_ANSWER = (4 << 20) // PAGE


@dataclass(frozen=True)
class Run:
    """Pages ``vaddr`` .. ``vaddr + pages * PAGE``, at ``offset`` in the pages image."""

    vaddr: int
    pages: int
    lazy: bool
    offset: int

    @property
    def end(self) -> int:
        return self.vaddr + self.pages * PAGE


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise MoveError("pagemap image: a number runs past its entry")
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(entry: bytes) -> dict[int, int]:
    """The numeric fields of one protobuf message (a pagemap entry has only those)."""
    out: dict[int, int] = {}
    i = 0
    while i < len(entry):
        key, i = _varint(entry, i)
        if key & 7 != 0:
            raise MoveError(f"pagemap image: field {key >> 3} is not a number")
        out[key >> 3], i = _varint(entry, i)
    return out


class PageMap:
    """Where each present page of one process is in its dump's pages image."""

    def __init__(self, pages_id: int, runs: list[Run]):
        self.pages_id = pages_id
        self.runs = runs
        self._starts = [r.vaddr for r in runs]

    @classmethod
    def read(cls, images: Path, pid: int) -> PageMap:
        """Read ``pagemap-PID.img``; MoveError if it is missing or not a pagemap."""
        try:
            raw = (images / f"pagemap-{pid}.img").read_bytes()
        except OSError as e:
            raise MoveError(f"no pagemap for process {pid}: {e.strerror}") from None
        if len(raw) < 8 or struct.unpack_from("<II", raw) != (IMG_COMMON_MAGIC, PAGEMAP_MAGIC):
            raise MoveError(f"pagemap-{pid}.img is not a CRIU pagemap image")
        entries: list[dict[int, int]] = []
        i = 8
        while i < len(raw):
            if i + 4 > len(raw):
                raise MoveError(f"pagemap-{pid}.img is cut short")
            (size,) = struct.unpack_from("<I", raw, i)
            i += 4
            if i + size > len(raw):
                raise MoveError(f"pagemap-{pid}.img is cut short")
            entries.append(_fields(raw[i:i + size]))
            i += size
        if not entries:
            raise MoveError(f"pagemap-{pid}.img has no header")
        pages_id = entries[0].get(1, 0)
        runs: list[Run] = []
        offset = 0
        for e in entries[1:]:
            vaddr, pages, flags = e.get(1, 0), e.get(2, 0), e.get(4, 0)
            if not flags & PE_PRESENT:  # in a parent image, or a hole: nothing here
                continue
            if vaddr % PAGE or (runs and vaddr < runs[-1].end):
                raise MoveError(f"pagemap-{pid}.img: pages at {vaddr:#x} out of order")
            runs.append(Run(vaddr, pages, bool(flags & PE_LAZY), offset))
            offset += pages * PAGE
        return cls(pages_id, runs)

    def eager(self) -> list[Run]:
        """The runs the restore reads from the pages image itself (not lazy)."""
        return [r for r in self.runs if not r.lazy]

    def find(self, vaddr: int) -> Run | None:
        """The run holding the page at ``vaddr``, or None."""
        i = bisect.bisect_right(self._starts, vaddr) - 1
        if i >= 0 and vaddr < self.runs[i].end:
            return self.runs[i]
        return None


class PageServer:
    """Answers one ``criu lazy-pages`` daemon from the images of a dump (see the module)."""

    def __init__(self, images: Path):
        self.images = images
        self.maps: dict[int, tuple[PageMap, int]] = {}  # process id: pagemap, open image
        self.served = 0  # pages
        self.done = False  # the daemon has every page and said so
        self._buf = bytearray()  # a request not yet whole

    def close(self) -> None:
        for _, fd in self.maps.values():
            os.close(fd)
        self.maps.clear()

    def _map(self, pid: int) -> tuple[PageMap, int]:
        if pid not in self.maps:
            pm = PageMap.read(self.images, pid)
            try:
                fd = os.open(self.images / f"pages-{pm.pages_id}.img", os.O_RDONLY)
            except OSError as e:
                raise MoveError(f"no pages image for process {pid}: {e.strerror}") from None
            self.maps[pid] = (pm, fd)
        return self.maps[pid]

    def answer(self, request: bytes) -> bytes | None:
        """The answer to one request header (header and pages), or None at the end.
        MoveError for anything CRIU would not ask: the stream is then broken."""
        cmd, pages, vaddr, pid = REQUEST.unpack(request)
        if cmd in (PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE):
            return None
        if cmd != PS_IOV_GET:
            raise MoveError(f"lazy pages: unexpected request {cmd:#x}")
        pm, fd = self._map(pid)
        run = pm.find(vaddr)
        if run is None or not run.lazy or vaddr % PAGE or pages < 1:
            raise MoveError(f"lazy pages: process {pid} has no lazy page at {vaddr:#x}")
        count = min(pages, (run.end - vaddr) // PAGE, MAX_ANSWER)
        length = count * PAGE
        try:
            data = os.pread(fd, length, run.offset + (vaddr - run.vaddr))
        except OSError as e:
            raise MoveError(f"lazy pages: {e.strerror}") from None
        if len(data) != length:
            raise MoveError(f"lazy pages: the pages image of process {pid} is cut short")
        self.served += count
        return REQUEST.pack(PS_IOV_ADD_F | PE_PRESENT << PS_CMD_BITS, count, vaddr, pid) + data

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Take bytes of the request stream, as they come; the answers to every request
        now complete, the last of them the end status once the daemon has said it is
        done (then :attr:`done`)."""
        if self.done:
            raise MoveError("lazy pages: a request after the end")
        self._buf += data
        answers = []
        while len(self._buf) >= REQUEST.size and not self.done:
            request = bytes(self._buf[:REQUEST.size])
            del self._buf[:REQUEST.size]
            answer = self.answer(request)
            if answer is None:
                self.done = True
                answer = END
            answers.append(answer)
        return answers
