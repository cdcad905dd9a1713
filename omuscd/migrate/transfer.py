"""The bytes of a move on its channel: image files (whole, or only the parts a lazy restore
reads itself), a job's spool, and their checks on the receiving side (a plain name in the
images directory, parts in order and within the file).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import trio

from omuscd.channel import Channel, ChannelError
from omuscd.jobs.spool import open_private
from omuscd.migrate.lazy import PAGE, PageMap

CHUNK = 1 << 20
IMAGE_STREAM = 9  # data frames carrying image and spool bytes
STEP_TIMEOUT = 30.0  # one step of a move on its channel
RESTORE_TIMEOUT = 120.0


def eager_runs(images: Path) -> dict[str, list[tuple[int, int]]]:
    """For each process's pages image: where the pages are that its restore reads
    itself (offset, length); the others come on demand.  Images of other memory
    (shared memory) are not named: they go whole."""
    runs: dict[str, list[tuple[int, int]]] = {}
    for f in images.glob("pagemap-*.img"):
        pid = f.stem.split("-", 1)[1]
        if pid.isdigit():
            pm = PageMap.read(images, int(pid))
            runs[f"pages-{pm.pages_id}.img"] = [(r.offset, r.pages * PAGE)
                                                for r in pm.eager()]
    return runs


async def send_sparse(ch: Channel, path: Path, runs: list[tuple[int, int]]) -> int:
    """Send these parts of ``path`` (the target leaves the rest a hole)."""
    size = path.stat().st_size
    await ch.send({"op": "sparse", "name": path.name, "size": size,
                   "runs": [[offset, length] for offset, length in runs]})
    with open(path, "rb") as f:
        for offset, length in runs:
            done = 0
            while done < length:
                chunk = os.pread(f.fileno(), min(CHUNK, length - done), offset + done)
                if not chunk:
                    raise OSError(f"{path.name} is shorter than its pagemap")
                await ch.send_data(IMAGE_STREAM, chunk)
                done += len(chunk)
    return sum(length for _, length in runs)


async def send_file(ch: Channel, op: str, name: str, path: Path) -> int:
    return await send_fd(ch, op, name, open_private(str(path), os.O_RDONLY))


async def send_fd(ch: Channel, op: str, name: str, fd: int) -> int:
    """Send the file open on ``fd`` (closed here), as it is now."""
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(fd).st_size
        await ch.send({"op": op, "name": name, "size": size})
        sent = 0
        while sent < size and (chunk := f.read(min(CHUNK, size - sent))):
            await ch.send_data(IMAGE_STREAM, chunk)
            sent += len(chunk)
    if sent != size:
        raise OSError(f"{name} became shorter while it was sent")
    return size


async def receive_file(ch: Channel, f: Any, name: str, size: int) -> None:
    """``size`` bytes from the channel into the open file ``f``."""
    got = 0
    while got < size:
        with trio.fail_after(STEP_TIMEOUT):
            item = await ch.receive(borrow=True)
        if not isinstance(item, tuple) or item[0] != IMAGE_STREAM:
            raise ChannelError("expected image data")
        f.write(item[1])
        got += len(item[1])
    if got != size:
        raise ChannelError(f"{name}: got {got} bytes of {size}")
    f.flush()


async def receive_sparse(ch: Channel, path: Path, size: Any, runs: Any) -> None:
    """A file of ``size`` bytes of which only ``runs`` (offset, length) come."""
    try:
        parts = [(int(offset), int(length)) for offset, length in runs]
        size = int(size)
    except (TypeError, ValueError):
        raise ChannelError("bad sparse file") from None
    end = 0
    for offset, length in parts:
        if offset < end or length < 0 or offset + length > size:
            raise ChannelError(f"{path.name}: parts out of order or past its end")
        end = offset + length
    with os.fdopen(open_private(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                   "wb") as f:
        f.truncate(size)
        for offset, length in parts:
            got = 0
            while got < length:
                with trio.fail_after(STEP_TIMEOUT):
                    item = await ch.receive(borrow=True)
                if not isinstance(item, tuple) or item[0] != IMAGE_STREAM:
                    raise ChannelError("expected image data")
                if got + len(item[1]) > length:
                    raise ChannelError(f"{path.name}: a part longer than announced")
                os.pwrite(f.fileno(), item[1], offset + got)
                got += len(item[1])


def image_name(name: Any) -> str:
    """The name of an image file a peer sends: a plain name in the images directory,
    never a path, nothing hidden, nothing of the daemon's own (ChannelError otherwise)."""
    if not isinstance(name, str) or not _IMAGE_NAME.fullmatch(name):
        raise ChannelError(f"bad image file name {str(name)[:40]!r}")
    return name


_IMAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", re.ASCII)
