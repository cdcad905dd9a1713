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

With ``checkpoint_dir`` (:class:`SharedDir`, a shared filesystem say) the node running the
job writes the images there, ``DIR/JOB/N`` (``.part-N`` first, renamed once the home
says the checkpoint is good), and the home keeps only ``meta.json``, naming that
directory (``dir``): :meth:`CheckpointStore.opened` opens it instead, walked from ``/``
without following a link, every directory root's and not writable by group or others,
the job's and the checkpoint's 0700 (:func:`omuscd.paths.open_root_dir`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from omuscd import ids
from omuscd.jobs.record import JobError
from omuscd.jobs.spool import Spool, SpoolError, open_private, private_dir
from omuscd.paths import open_root_dir

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

    def fill(self, images: str) -> None:
        """Take every image of the directory ``images`` (CRIU's logs left out)."""
        d = os.open(images, _DIR_FLAGS)
        try:
            for name in os.listdir(d):
                if not name.endswith(".log"):
                    self.adopt(name, d)
        finally:
            os.close(d)

    def sync(self) -> int:
        """Every file and the directory on disk; the size of the files."""
        size = 0
        for name in os.listdir(self.fd):
            f = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
            try:
                st = os.fstat(f)
                if st.st_mode & 0o077:  # CRIU's own mode: the images are root's alone
                    os.fchmod(f, stat.S_IMODE(st.st_mode) & 0o700)
                os.fsync(f)
                size += st.st_size if stat.S_ISREG(st.st_mode) else 0
            finally:
                os.close(f)
        os.fsync(self.fd)
        return size

    def adopt(self, name: str, src_dir: int) -> None:
        """Take the file ``name`` of the directory open on ``src_dir`` (the same
        filesystem: the state directory), else copy it."""
        try:
            os.rename(name, name, src_dir_fd=src_dir, dst_dir_fd=self.fd)
            return
        except OSError:
            pass
        _copy(name, src_dir, self.fd, os.O_EXCL)


class CheckpointStore:
    """The checkpoints of this home's jobs (see the module's docstring)."""

    def __init__(self, spool: Spool):
        self.spool = spool

    @contextmanager
    def _top(self, job_id: str, create: bool = False) -> Iterator[int]:
        with self.spool._dir(job_id) as d:
            fd = private_dir(TOP, dir_fd=d) if create else _own_dir(TOP, d)
            try:
                yield fd
            finally:
                os.close(fd)

    def next_seq(self, job_id: str) -> int:
        """The number the next checkpoint of the job will have (see commit)."""
        try:
            with self._top(job_id) as top:
                seqs = _seqs(top)
        except (OSError, ValueError):
            return 1
        return (seqs[-1] if seqs else 0) + 1

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
        size) for the job's record.  A checkpoint whose images are in a checkpoint_dir
        (meta ``dir``) brings its size and number (``seq``, from :meth:`next_seq`)."""
        meta = dict(meta)
        if "dir" not in meta:
            meta["size"] = _tree_size(pending.fd)
        fd = open_private(META, os.O_WRONLY | os.O_CREAT | os.O_EXCL, pending.fd)
        try:
            os.write(fd, json.dumps(meta).encode())
        finally:
            os.close(fd)
        pending.sync()
        with self._top(job_id) as top:
            seqs = _seqs(top)
            seq = int(meta.get("seq") or 0) or (seqs[-1] if seqs else 0) + 1
            if seq in seqs:
                raise SpoolError(f"checkpoint {seq} of job {job_id} exists already")
            os.rename(PART, str(seq), src_dir_fd=top, dst_dir_fd=top)
            os.fsync(top)
            _forget_shared([_drop(top, old) for old in sorted([*seqs, seq])[:-KEEP]])
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
        """The directory of checkpoint ``seq``'s images, open (never through a link):
        here, or in the checkpoint_dir its meta names."""
        with self._top(job_id) as top:
            meta = _read_meta(top, int(seq))
            if meta is None:
                raise SpoolError(f"checkpoint {seq} of job {job_id} is missing or refused")
            if "dir" in meta:
                try:
                    fd = open_root_dir(str(meta["dir"]), inner=2)
                except OSError as e:
                    raise SpoolError(f"its images cannot be opened here: {e}") from None
            else:
                fd = _own_dir(str(int(seq)), top)
            try:
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
                if name != META:
                    _copy(name, d, dest, os.O_TRUNC)

    def remove(self, job_id: str) -> None:
        """Forget a job's checkpoints (it ended for good), those in a checkpoint_dir too."""
        shared: list[str] = []
        try:
            with self._top(job_id) as top:
                shared = [_drop(top, seq) for seq in _seqs(top)]
        except (OSError, ValueError):
            pass
        _forget_shared(shared, whole=True)
        try:
            with self.spool._dir(job_id) as d:
                shutil.rmtree(TOP, dir_fd=d, ignore_errors=True)
        except (OSError, ValueError):
            pass


class SharedPart:
    """A checkpoint being written into a checkpoint_dir (see SharedDir.prepare): the job's
    directory there, open, and the ``.part-N`` in it."""

    def __init__(self, job_fd: int, name: str, pending: Pending, where: str):
        self.job_fd = job_fd
        self.name = name
        self.pending = pending
        self.where = where  # the directory it becomes, for the record at the home

    def close(self) -> None:
        """Forget it: removed unless committed."""
        if self.pending.fd >= 0:
            os.close(self.pending.fd)
            self.pending.fd = -1
        if self.job_fd >= 0:
            shutil.rmtree(self.name, dir_fd=self.job_fd, ignore_errors=True)
            os.close(self.job_fd)
            self.job_fd = -1


class SharedDir:
    """``checkpoint_dir``: where the node running a job writes its checkpoints' images,
    ``DIR/JOB/N``, when this node has one (see the module's docstring).  The directory is
    walked again for each checkpoint: one made unreachable (a file server down, renamed,
    replaced) fails that checkpoint with the reason, and the good ones stay."""

    def __init__(self, path: str):
        self.path = path.rstrip("/") or "/"

    def prepare(self, job_id: str, seq: int, images: str) -> SharedPart:
        """Write the images of the directory ``images`` into ``DIR/JOB/.part-SEQ``, synced;
        OSError (in words) if the directory cannot be used.  Blocking (a slow or dead file
        server): run in a thread."""
        try:
            root = open_root_dir(self.path)
        except OSError as e:
            raise OSError(f"checkpoint_dir {self.path} cannot be used: {e}") from None
        try:
            job_fd = private_dir(ids.job_id(job_id), dir_fd=root)
        except OSError as e:
            raise OSError(f"checkpoint_dir {self.path}: {e}") from None
        finally:
            os.close(root)
        name = f"{PART}-{int(seq)}"
        part = SharedPart(job_fd, name, Pending(-1), f"{self.path}/{job_id}/{int(seq)}")
        try:
            _unlink_any(name, job_fd)
            part.pending.fd = private_dir(name, dir_fd=job_fd)
            part.pending.fill(images)
            part.pending.size = part.pending.sync()
        except BaseException:
            part.close()
            raise
        return part

    @staticmethod
    def commit(part: SharedPart, seq: int) -> None:
        """Make the part checkpoint ``seq`` there; older ones beyond KEEP removed.  What
        stands at ``seq`` or beyond was left by checkpoints its home never recorded (it
        numbers them: a home that lost its state starts again from 1), and goes too."""
        name = str(int(seq))
        _unlink_any(name, part.job_fd)
        os.rename(part.name, name, src_dir_fd=part.job_fd, dst_dir_fd=part.job_fd)
        os.fsync(part.job_fd)
        kept = [n for n in _seqs(part.job_fd) if n <= seq][-KEEP:]
        for old in set(_seqs(part.job_fd)) - set(kept):
            _unlink_any(str(old), part.job_fd)


def copy_shared(where: str, images: str) -> int:
    """Copy the images of the checkpoint in the checkpoint_dir directory ``where`` (as its
    record names it) into the directory ``images`` (root's, made by the daemon); the bytes
    copied.  The same checks as the home's (see CheckpointStore.opened); blocking (a file
    server): run in a thread."""
    src = open_root_dir(where, inner=2)
    try:
        dst = os.open(images, _DIR_FLAGS)
        try:
            names = [n for n in os.listdir(src) if n != META]
            for name in names:
                _copy(name, src, dst, os.O_TRUNC)
            return sum(os.stat(n, dir_fd=dst, follow_symlinks=False).st_size for n in names)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _copy(name: str, src_dir: int, dst_dir: int, how: int) -> None:
    """Copy the file ``name`` between two open directories, neither end through a link
    nor another's file (``how``: O_EXCL for a new file, O_TRUNC to replace one)."""
    if "/" in name or name in (".", ".."):
        raise SpoolError(f"bad image name {name[:40]!r}")
    src = open_private(name, os.O_RDONLY, src_dir)
    try:
        dst = open_private(name, os.O_WRONLY | os.O_CREAT | how, dst_dir)
        try:
            while os.sendfile(dst, src, None, 1 << 24):
                pass
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _own_dir(name: str, dir_fd: int) -> int:
    """A directory of this daemon's own in ``dir_fd``, open, never through a link."""
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or not stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise SpoolError(f"{name} is not this daemon's own (uid {st.st_uid})")
    return fd


def _unlink_any(name: str, dir_fd: int) -> None:
    """Remove ``name`` whatever it is (a link itself, never what it points to)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd, ignore_errors=True)
    else:
        os.unlink(name, dir_fd=dir_fd)


def _drop(top: int, seq: int) -> str:
    """Remove checkpoint ``seq`` here; where its images are in a checkpoint_dir ('' if
    not there), for :func:`_forget_shared`."""
    meta = _read_meta(top, seq)
    shutil.rmtree(str(seq), dir_fd=top, ignore_errors=True)
    return str(meta.get("dir", "")) if meta else ""


def _forget_shared(dirs: list[str], whole: bool = False) -> None:
    """Remove checkpoints' images in a checkpoint_dir (``whole``: the job's directory there
    too, the job ended), where it can be reached and is what it should be.  In a thread
    of its own, not waited for: a file server that does not answer holds that thread,
    not the daemon nor the checkpoint that made these old."""
    dirs = [d for d in dirs if d]
    if dirs:
        threading.Thread(target=_remove_shared, args=(dirs, whole), daemon=True,
                         name="omuscd-ckpt-remove").start()


def _remove_shared(dirs: list[str], whole: bool) -> None:
    for where in dirs:
        parent, _, name = where.rpartition("/")
        try:
            fd = open_root_dir(parent, inner=1)
            try:
                if name.isdigit():
                    _unlink_any(name, fd)
            finally:
                os.close(fd)
        except OSError as e:
            log.info("checkpoint images in %s not removed: %s", where, e)
    for job_dir in {d.rpartition("/")[0] for d in dirs} if whole else ():
        parent, _, name = job_dir.rpartition("/")
        try:
            fd = open_root_dir(parent)
            try:
                os.rmdir(ids.job_id(name), dir_fd=fd)
            finally:
                os.close(fd)
        except (OSError, ValueError) as e:
            log.info("%s not removed: %s", job_dir, e)


def _seqs(top: int) -> list[int]:
    return sorted(int(n) for n in os.listdir(top) if n.isdigit() and len(n) < 10)


def _read_meta(top: int, seq: int) -> dict[str, Any] | None:
    try:
        d = _own_dir(str(seq), top)
    except OSError:  # a link (ELOOP), another's, or gone
        return None
    try:
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
