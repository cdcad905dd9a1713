"""A job's checkpoints at its home: ``STATE_DIR/spool/JOB/checkpoints/SEQ/`` with CRIU's
images and ``meta.json`` (when it was taken, its size, the output the node had written at
that instant, the sizes of the files the job had open for writing, the spool paths CRIU
knows its output by).

Root's own, like the rest of the spool (directories 0700, files 0600), every open made
relative to a directory descriptor without following a link.  A checkpoint is written
to ``.part`` first, every file and the directory synced, then renamed to its number:
one that did not finish never replaces a good one, and a restart finds only whole ones.
The last :data:`KEEP` are kept (the latest may turn out unusable: a file it needs was
changed in a way that cannot be cut back).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from omuscd.jobs.record import JobError
from omuscd.jobs.spool import Spool, SpoolError, open_private, private_dir

log = logging.getLogger("omuscd.jobs")

KEEP = 2
TOP = "checkpoints"
PART = ".part"
META = "meta.json"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Pending:
    """A checkpoint being written (see CheckpointStore.begin): files go in, then it is
    committed whole or dropped."""

    def __init__(self, fd: int):
        self.fd = fd  # the .part directory
        self.size = 0

    def create(self, name: str) -> int:
        """A new file of this checkpoint, open for writing (the caller closes it); its
        name is a plain one (the caller checked it)."""
        if "/" in name or name in (".", "..", META):
            raise SpoolError(f"bad image name {name[:40]!r}")
        return open_private(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self.fd)

    def adopt(self, name: str, src_dir: int) -> None:
        """Take the file ``name`` of the directory open on ``src_dir`` (the same
        filesystem: the state directory), else copy it."""
        try:
            os.rename(name, name, src_dir_fd=src_dir, dst_dir_fd=self.fd)
            return
        except OSError:
            pass
        src = open_private(name, os.O_RDONLY, src_dir)
        try:
            dst = self.create(name)
            try:
                while os.sendfile(dst, src, None, 1 << 24):
                    pass
            finally:
                os.close(dst)
        finally:
            os.close(src)


class CheckpointStore:
    """The checkpoints of this home's jobs (see the module's docstring)."""

    def __init__(self, spool: Spool):
        self.spool = spool

    @contextmanager
    def _top(self, job_id: str, create: bool = False) -> Iterator[int]:
        with self.spool._dir(job_id) as d:
            if create:
                fd = private_dir(TOP, dir_fd=d)
            else:
                fd = os.open(TOP, _DIR_FLAGS, dir_fd=d)
                if os.fstat(fd).st_uid != os.geteuid():
                    os.close(fd)
                    raise SpoolError(f"checkpoints of job {job_id} are not this daemon's")
            try:
                yield fd
            finally:
                os.close(fd)

    @contextmanager
    def begin(self, job_id: str) -> Iterator[Pending]:
        """A fresh ``.part`` directory for a new checkpoint; removed on leaving unless it
        was committed (renamed)."""
        try:
            ctx = self._top(job_id, create=True)
            top = ctx.__enter__()
        except (OSError, ValueError) as e:
            raise JobError(f"job {job_id}: cannot keep a checkpoint: {e}") from None
        try:
            shutil.rmtree(PART, dir_fd=top, ignore_errors=True)
            fd = private_dir(PART, dir_fd=top)
            try:
                yield Pending(fd)
            finally:
                os.close(fd)
                shutil.rmtree(PART, dir_fd=top, ignore_errors=True)
        finally:
            ctx.__exit__(None, None, None)

    def commit(self, job_id: str, pending: Pending, meta: dict[str, Any]) -> dict[str, Any]:
        """Make the pending checkpoint the latest: meta written, all synced, renamed to the
        next number; the oldest beyond KEEP removed.  Returns its summary (seq, time,
        size) for the job's record."""
        meta = dict(meta)
        meta["size"] = _tree_size(pending.fd)
        data = json.dumps(meta).encode()
        fd = open_private(META, os.O_WRONLY | os.O_CREAT | os.O_EXCL, pending.fd)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        for name in os.listdir(pending.fd):
            f = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pending.fd)
            try:
                os.fsync(f)
            finally:
                os.close(f)
        os.fsync(pending.fd)
        with self._top(job_id) as top:
            seqs = _seqs(top)
            seq = (seqs[-1] if seqs else 0) + 1
            os.rename(PART, str(seq), src_dir_fd=top, dst_dir_fd=top)
            os.fsync(top)
            for old in [*seqs, seq][:-KEEP]:
                shutil.rmtree(str(old), dir_fd=top, ignore_errors=True)
        return {"seq": seq, "time": meta.get("time", 0.0), "size": meta["size"]}

    def latest(self, job_id: str, before: int | None = None) -> tuple[int, dict[str, Any]] | None:
        """The newest whole checkpoint (older than ``before`` if given): its number and
        meta; None if there is none.  One that is a link or unreadable is skipped."""
        try:
            with self._top(job_id) as top:
                for seq in reversed(_seqs(top)):
                    if before is not None and seq >= before:
                        continue
                    meta = _read_meta(top, seq)
                    if meta is not None:
                        return seq, meta
                    log.warning("job %s: checkpoint %d refused (a link, or unreadable)",
                                job_id, seq)
        except (OSError, ValueError):
            return None
        return None

    @contextmanager
    def opened(self, job_id: str, seq: int) -> Iterator[int]:
        """The directory of checkpoint ``seq``, open (never through a link)."""
        with self._top(job_id) as top:
            fd = os.open(str(int(seq)), _DIR_FLAGS, dir_fd=top)
            try:
                if os.fstat(fd).st_uid != os.geteuid():
                    raise SpoolError(f"checkpoint {seq} of job {job_id} is not ours")
                yield fd
            finally:
                os.close(fd)

    def images(self, job_id: str, seq: int) -> list[str]:
        """The image files of a checkpoint (its meta left out)."""
        with self.opened(job_id, seq) as d:
            return sorted(n for n in os.listdir(d) if n != META)

    def copy_to(self, job_id: str, seq: int, dest: int) -> None:
        """Copy the images of checkpoint ``seq`` into the directory open on ``dest``."""
        with self.opened(job_id, seq) as d:
            for name in os.listdir(d):
                if name == META:
                    continue
                src = open_private(name, os.O_RDONLY, d)
                try:
                    dst = open_private(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, dest)
                    try:
                        while os.sendfile(dst, src, None, 1 << 24):
                            pass
                    finally:
                        os.close(dst)
                finally:
                    os.close(src)

    def remove(self, job_id: str) -> None:
        """Forget a job's checkpoints (it ended for good)."""
        try:
            with self.spool._dir(job_id) as d:
                shutil.rmtree(TOP, dir_fd=d, ignore_errors=True)
        except (OSError, ValueError):
            pass


def _seqs(top: int) -> list[int]:
    return sorted(int(n) for n in os.listdir(top) if n.isdigit() and len(n) < 10)


def _read_meta(top: int, seq: int) -> dict[str, Any] | None:
    try:
        d = os.open(str(seq), _DIR_FLAGS, dir_fd=top)
    except OSError:  # a link (ELOOP), or gone
        return None
    try:
        st = os.fstat(d)
        if st.st_uid != os.geteuid() or not stat.S_ISDIR(st.st_mode):
            return None
        fd = open_private(META, os.O_RDONLY, d)
        with os.fdopen(fd, "rb") as f:
            meta = json.loads(f.read(1 << 20))
        return meta if isinstance(meta, dict) else None
    except (OSError, ValueError):
        return None
    finally:
        os.close(d)


def _tree_size(fd: int) -> int:
    total = 0
    for name in os.listdir(fd):
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if stat.S_ISREG(st.st_mode):
            total += st.st_size
    return total
