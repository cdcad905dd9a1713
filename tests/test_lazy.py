"""Post-copy: a job's memory served on demand from its dump's images (omuscd.migrate.lazy),
first against made-up images, then to a real ``criu lazy-pages`` restoring a real job."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from omuscd.migrate import MoveError
from omuscd.migrate.criu import Criu, find_criu
from omuscd.migrate.lazy import (
    IMG_COMMON_MAGIC,
    PAGE,
    PAGEMAP_MAGIC,
    PE_LAZY,
    PE_PRESENT,
    PS_IOV_FORCE_CLOSE,
    PS_IOV_GET,
    REQUEST,
    PageMap,
    PageServer,
)
from tests.cluster import wait_for
from tests.test_migration import REASON


def copy_eager(images: Path, pid: int, dest: Path) -> int:
    """What the source sends of a pages image for a post-copy move (migration's
    send_sparse and receive_sparse, without the channel): only the pages the restore
    reads itself, at their places, the rest a hole; the bytes written."""
    pm = PageMap.read(images, pid)
    name = f"pages-{pm.pages_id}.img"
    written = 0
    with open(images / name, "rb") as src, open(dest / name, "wb") as out:
        out.truncate(os.fstat(src.fileno()).st_size)
        for run in pm.eager():
            data = os.pread(src.fileno(), run.pages * PAGE, run.offset)
            os.pwrite(out.fileno(), data, run.offset)
            written += len(data)
    return written


async def serve_stream(server: PageServer, stream: trio.abc.Stream) -> int:
    """What postcopy.serve does over the channel, over a plain stream: answer requests
    until the daemon says it has everything; the pages served.  MoveError if the
    stream ends before that."""
    try:
        while not server.done:
            got = await stream.receive_some(65536)
            if not got:
                raise MoveError("lazy pages: the lazy-pages daemon went away before it "
                                "had every page")
            for answer in server.feed(got):
                await stream.send_all(answer)
        return server.served
    finally:
        server.close()


def lazy_pages(pm: PageMap) -> int:
    return sum(r.pages for r in pm.runs if r.lazy)


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def message(fields: dict[int, int]) -> bytes:
    body = b"".join(varint(k << 3) + varint(v) for k, v in fields.items())
    return struct.pack("<I", len(body)) + body


def images(tmp_path: Path, runs: list[tuple[int, int, int]], pid: int = 1) -> Path:
    """A pagemap of ``runs`` (address, pages, flags) and a pages image whose every page
    holds its own address, as a dump would write them."""
    raw = struct.pack("<II", IMG_COMMON_MAGIC, PAGEMAP_MAGIC) + message({1: 7})
    pages = bytearray()
    for vaddr, count, flags in runs:
        raw += message({1: vaddr, 2: count, 4: flags})
        if flags & PE_PRESENT:
            for i in range(count):
                pages += struct.pack("<Q", vaddr + i * PAGE).ljust(PAGE, b"\xab")
    (tmp_path / f"pagemap-{pid}.img").write_bytes(raw)
    (tmp_path / "pages-7.img").write_bytes(pages)
    return tmp_path


RUNS = [(0x10000, 2, PE_PRESENT), (0x20000, 3, PE_PRESENT | PE_LAZY),
        (0x30000, 4, 1), (0x40000, 5, PE_PRESENT | PE_LAZY)]  # 1: in a parent image


def test_the_pagemap_says_where_each_page_is_and_which_come_later(tmp_path):
    pm = PageMap.read(images(tmp_path, RUNS), 1)
    assert pm.pages_id == 7
    assert [(r.vaddr, r.pages, r.lazy, r.offset) for r in pm.runs] == [
        (0x10000, 2, False, 0), (0x20000, 3, True, 2 * PAGE), (0x40000, 5, True, 5 * PAGE)]
    assert lazy_pages(pm) == 8
    assert [r.vaddr for r in pm.eager()] == [0x10000]
    assert pm.find(0x20000 + 2 * PAGE).vaddr == 0x20000
    assert pm.find(0x20000 + 3 * PAGE) is None and pm.find(0x30000) is None
    assert pm.find(0x0) is None


@pytest.mark.parametrize("raw, said", [
    (b"", "not a CRIU pagemap"),
    (struct.pack("<II", IMG_COMMON_MAGIC, 0x12345678), "not a CRIU pagemap"),
    (struct.pack("<II", IMG_COMMON_MAGIC, PAGEMAP_MAGIC), "no header"),
    (struct.pack("<II", IMG_COMMON_MAGIC, PAGEMAP_MAGIC) + b"\x09\x00\x00\x00\x08", "cut short"),
    (struct.pack("<II", IMG_COMMON_MAGIC, PAGEMAP_MAGIC) + b"\x02\x00\x00\x00\x08\xff",
     "runs past"),
    (struct.pack("<II", IMG_COMMON_MAGIC, PAGEMAP_MAGIC) + b"\x02\x00\x00\x00\x0a\x00",
     "not a number"),
    (struct.pack("<II", IMG_COMMON_MAGIC, PAGEMAP_MAGIC) + message({1: 1})
     + message({1: 0x20000, 2: 1, 4: PE_PRESENT}) + message({1: 0x10000, 2: 1, 4: PE_PRESENT}),
     "out of order"),
])
def test_a_damaged_pagemap_is_refused_with_its_fault(tmp_path, raw, said):
    (tmp_path / "pagemap-1.img").write_bytes(raw)
    with pytest.raises(MoveError, match=said):
        PageMap.read(tmp_path, 1)


def test_the_restore_gets_only_the_pages_it_reads_itself(tmp_path):
    (tmp_path / "src").mkdir()
    src = images(tmp_path / "src", RUNS)
    dest = tmp_path / "dest"
    dest.mkdir()
    assert copy_eager(src, 1, dest) == 2 * PAGE
    got = (dest / "pages-7.img").read_bytes()
    want = (src / "pages-7.img").read_bytes()
    assert len(got) == len(want) and got[:2 * PAGE] == want[:2 * PAGE]
    assert got[2 * PAGE:] == bytes(8 * PAGE)  # the lazy pages are a hole


def get(vaddr: int, pages: int, pid: int = 1) -> bytes:
    return REQUEST.pack(PS_IOV_GET, pages, vaddr, pid)


def test_each_request_gets_its_pages_and_never_more_than_its_run(tmp_path):
    server = PageServer(images(tmp_path, RUNS))
    try:
        answer = server.answer(get(0x20000 + PAGE, 10))
        assert answer is not None
        cmd, pages, vaddr, pid = REQUEST.unpack(answer[:REQUEST.size])
        assert (cmd & 0xFFFF, cmd >> 16, pages, vaddr, pid) == (6, PE_PRESENT, 2,
                                                                 0x20000 + PAGE, 1)
        body = answer[REQUEST.size:]
        assert len(body) == 2 * PAGE
        assert [struct.unpack_from("<Q", body, i * PAGE)[0] for i in range(2)] == [
            0x20000 + PAGE, 0x20000 + 2 * PAGE]
        answer = server.answer(get(0x40000, 1))
        assert answer is not None and answer[REQUEST.size:REQUEST.size + 8] == struct.pack(
            "<Q", 0x40000)
        assert server.served == 3
        assert server.answer(REQUEST.pack(PS_IOV_FORCE_CLOSE, 0, 0, 0)) is None
    finally:
        server.close()


@pytest.mark.parametrize("request_, said", [
    (get(0x10000, 1), "no lazy page"),  # the restore has read it itself
    (get(0x30000, 1), "no lazy page"),  # not in this image
    (get(0x20000 + 1, 1), "no lazy page"),
    (get(0x20000, 0), "no lazy page"),
    (get(0x20000, 1, pid=9), "no pagemap for process 9"),
    (REQUEST.pack(1, 1, 0x20000, 1), "unexpected request"),
])
def test_a_request_criu_would_not_make_is_refused(tmp_path, request_, said):
    server = PageServer(images(tmp_path, RUNS))
    try:
        with pytest.raises(MoveError, match=said):
            server.answer(request_)
    finally:
        server.close()


def test_the_server_ends_when_told_and_fails_if_the_daemon_goes_away_first(tmp_path):
    src = images(tmp_path, RUNS)

    async def talk(requests: bytes, close: bool) -> tuple[int | str, bytes]:
        mine, theirs = socket.socketpair()
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(mine))
        theirs.sendall(requests)  # split anywhere: the server reads whole headers
        if close:
            theirs.shutdown(socket.SHUT_WR)
        try:
            result: int | str = await serve_stream(PageServer(src), stream)
        except MoveError as e:
            result = str(e)
        theirs.setblocking(False)
        got = b""
        while True:
            try:
                chunk = theirs.recv(1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            got += chunk
        theirs.close()
        await stream.aclose()
        return result, got

    served, got = trio.run(talk, get(0x20000, 3) + REQUEST.pack(PS_IOV_FORCE_CLOSE, 0, 0, 0),
                           False)
    assert served == 3
    assert len(got) == REQUEST.size + 3 * PAGE + 4 and got.endswith(struct.pack("<i", 0))
    said, got = trio.run(talk, get(0x20000, 3) + get(0x40000, 1)[:10], True)
    assert "went away before it had every page" in str(said)
    assert len(got) == REQUEST.size + 3 * PAGE  # what was asked in full was answered


HOLD = """
import hashlib, sys, time
data = bytearray(int(sys.argv[1]) << 20)
for i in range(0, len(data), 4096):
    data[i:i + 8] = i.to_bytes(8, "little")
n = 0
while True:
    n += 1
    print(n, hashlib.sha256(data).hexdigest(), flush=True)
    time.sleep(0.1)
"""


@pytest.mark.skipif(REASON is not None, reason=str(REASON))
def test_a_job_restored_lazily_gets_all_its_memory_from_the_server(tmp_path):
    """A real job (64 MB) dumped, restored with --lazy-pages from images without its lazy
    pages, and fed by PageServer: it carries on with the same memory."""
    mb = 64
    want = hashlib.sha256(bytes(
        b"".join(i.to_bytes(8, "little").ljust(4096, b"\0")
                 for i in range(0, mb << 20, 4096)))).hexdigest()
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    dest.mkdir()
    out = tmp_path / "out"
    with open(out, "w") as f:  # a file: CRIU restores it by path
        launcher = subprocess.Popen(["unshare", "--pid", "--fork", "setsid", sys.executable,
                                     "-c", HOLD, str(mb)], stdout=f,
                                    stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    restored = None
    init = None
    try:
        wait_for(lambda: out.read_text().startswith("1 "), 60, "the job to fill its memory")
        init = int(subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                                  text=True).stdout.split()[0])
        criu = Criu(find_criu(None))

        async def move() -> tuple[int, int, int]:
            await criu.check()
            try:
                await criu.dump(init, src)
                for f in src.iterdir():
                    if f.suffix != ".log" and not f.name.startswith("pages-"):
                        shutil.copy(f, dest / f.name)
                lazy = 0
                for pm in src.glob("pagemap-*.img"):
                    pid = int(pm.stem.split("-")[1])
                    copy_eager(src, pid, dest)
                    lazy += lazy_pages(PageMap.read(src, pid))
                mine, theirs = socket.socketpair()
                daemon = await criu.lazy_pages(dest, theirs.fileno())
                theirs.close()
                server = PageServer(src)
                try:
                    async with trio.open_nursery() as nursery:
                        served: list[int] = []

                        async def serve() -> None:
                            stream = trio.SocketStream(trio.socket.from_stdlib_socket(mine))
                            served.append(await serve_stream(server, stream))

                        nursery.start_soon(serve)
                        pid = await criu.restore(dest, [], dest / "pid", lazy=True)
                        os.kill(pid, signal.SIGCONT)
                        with trio.fail_after(60):
                            code = await daemon.wait()
                finally:
                    if daemon.returncode is None:
                        daemon.kill()
                        await daemon.wait()
                assert code == 0, (dest / "lazy-pages.log").read_text()[-2000:]
                return pid, served[0], lazy
            finally:
                criu.close()

        restored, served, lazy = trio.run(move)
        assert served == lazy > (mb << 20) // PAGE
        os.kill(init, signal.SIGKILL)  # the frozen original
        seen = len(out.read_text().splitlines())
        wait_for(lambda: len(out.read_text().splitlines()) >= seen + 3, 30,
                 "the restored job to go on")
        lines = [ln.split() for ln in out.read_text().splitlines()]
        assert [int(n) for n, _ in lines] == list(range(1, len(lines) + 1))
        assert {digest for _, digest in lines} == {want}
    finally:
        for pid in (restored, init):
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if restored is not None:
            try:
                os.waitpid(restored, 0)
            except ChildProcessError:
                pass
        launcher.kill()
        launcher.wait()


def test_the_guard_kills_a_job_whose_daemon_dies_and_holds_its_page_socket():
    """omuscd.migrate.target's guard: if the target daemon dies before a post-copy job has
    every page, the job is killed, and the lazy-pages socket stays open until then (else
    lazy-pages would end and the job read zeros); told 'done', it leaves the job alone.
    It starts before the restore, with lazy-pages, and is told the job's pid after it; a
    daemon that dies kills lazy-pages through it too, also before the pid (nothing
    restored: lazy-pages would wait for the restore for ever, its parent init, as it was
    left); told 'done' then (the move given up by a living daemon, which kills lazy-pages
    itself), it kills nothing."""
    from omuscd.migrate.target import _guard, _guard_done, _guard_watch

    async def main() -> None:
        for daemon_dies in (True, False, "before the pid", "done before the pid"):
            job = await trio.lowlevel.open_process(["sleep", "30"])
            # stands for it, in a process group of its own as lazy-pages is (the guard
            # kills the group: what it forked goes with it)
            lazyd = await trio.lowlevel.open_process(["sleep", "30"], start_new_session=True)
            mine, lazyd_end = socket.socketpair()
            guard = await _guard(mine.fileno(), lazyd.pid)
            mine.close()  # the daemon's own copy gone: only the guard holds it now
            lazyd_end.setblocking(False)
            with pytest.raises(BlockingIOError):  # open: no EOF for lazy-pages
                lazyd_end.recv(1)
            assert guard.stdin is not None
            if daemon_dies == "before the pid":
                await guard.stdin.aclose()
                with trio.fail_after(10):
                    assert await guard.wait() == 0
                    assert await lazyd.wait() == -signal.SIGKILL
                assert job.returncode is None
            elif daemon_dies == "done before the pid":
                await _guard_done(guard)
                assert guard.returncode == 0
                assert job.returncode is None and lazyd.returncode is None
            else:
                await _guard_watch(guard, job.pid)
                if daemon_dies:
                    await guard.stdin.aclose()  # as when the daemon dies
                    with trio.fail_after(10):
                        assert await job.wait() == -signal.SIGKILL
                        assert await lazyd.wait() == -signal.SIGKILL
                        await guard.wait()
                else:
                    await _guard_done(guard)
                    assert guard.returncode == 0 and job.returncode is None
                    assert lazyd.returncode is None
            for proc in (job, lazyd):
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()
            assert lazyd_end.recv(1) == b""  # the guard gone, its end closed
            lazyd_end.close()

    trio.run(main)


def test_the_target_writes_a_sparse_image_and_refuses_a_bad_one(tmp_path):
    """omuscd.migrate.transfer.receive_sparse: the announced parts land at their places, the rest
    is a hole; parts out of order, past the end, longer than announced, or not numbers
    are refused (ChannelError: the move is abandoned, nothing restored)."""
    from types import SimpleNamespace

    from omuscd.channel import ChannelError
    from omuscd.migrate.transfer import IMAGE_STREAM, receive_sparse

    def channel(frames: list[bytes]) -> SimpleNamespace:
        items = iter([(IMAGE_STREAM, f) for f in frames])

        async def receive(borrow: bool = False):
            return next(items)
        return SimpleNamespace(receive=receive)

    path = tmp_path / "pages-1.img"
    trio.run(receive_sparse, channel([b"ab", b"cd", b"ef"]), path, 10,
             [[1, 4], [8, 2]])
    assert path.read_bytes() == b"\0abcd\0\0\0ef"
    for size, runs, frames in ((10, [[4, 2], [1, 2]], [b"xx", b"yy"]),  # out of order
                               (10, [[9, 2]], [b"xx"]),                 # past the end
                               (10, [[0, 2]], [b"xxx"]),                # longer
                               ("ten", [[0, 2]], [b"xx"]),              # not a number
                               (10, [[0]], [b"xx"])):                   # not a pair
        with pytest.raises(ChannelError):
            trio.run(receive_sparse, channel(frames), path, size, runs)
