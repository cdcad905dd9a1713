"""Spool files: a job's output and status, and its record, on the node that keeps them.

The node running a job keeps its spool: ``STATE_DIR/spool/JOB/stdout``, ``stderr`` and
``status``.  Output lives in files rather than pipes because a job must not share pipes with
the daemon if it is ever to be checkpointed and moved (CRIU); the home node keeps a copy of a
remote job's output as it streams in, so ``output`` and ``attach`` work there even if the
other node dies.  Everything here is root's and opened without following links.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omuscd import ids
from omuscd.jobs.record import STREAM_FILES, Job, JobError, job_order

log = logging.getLogger("omuscd.jobs")


class SpoolError(OSError):
    """Something in a spool is not what the daemon made (a link, another owner, a
    special file): refused, and said so in the log."""


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_RECORD, _RECORD_TMP = "job.json", "job.json.tmp"
_SPOOL_FILES = (*STREAM_FILES.values(), "status")


def private_dir(path: Path | str, dir_fd: int | None = None) -> int:
    """Make (or take) a directory only the daemon's user may enter: created 0700, never
    through a link, refused if another user owns it; a mode left open by an older version
    is closed.  Returns an open descriptor of it (the caller closes it): what is made
    inside is made relative to it, so no link along the way is followed."""
    try:
        os.mkdir(path, 0o700, dir_fd=dir_fd)
    except FileExistsError:
        pass
    fd = os.open(path, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise SpoolError(f"{path} belongs to uid {st.st_uid}, not to this daemon")
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o700)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_private(name: str, flags: int, dir_fd: int | None = None, mode: int = 0o600) -> int:
    """Open a regular file of the daemon's own, never through a link: refused (SpoolError)
    if it is anything else, another user's, or has another name (a hard link)."""
    fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode,
                 dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
            raise SpoolError(f"{name} is not a plain file of this daemon's own (mode "
                             f"{st.st_mode:o}, uid {st.st_uid}, {st.st_nlink} links)")
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o600)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Spool:
    """Where job files live on one node: ``STATE_DIR/spool``, the daemon's own (0700),
    and in it a directory per job (0700) with its files (0600), all the daemon's.  The
    job's user never reaches them by path: the job writes through descriptors the daemon
    opened for it, and its user reads them through the daemon (``output``, ``attach``).
    Every open is made relative to a directory descriptor, without following links; a
    spool left by an older version (the job's user owned it) is taken back at start."""

    def __init__(self, state_dir: str):
        self.root = Path(state_dir) / "spool"
        self._root_fd: int | None = None

    def _root(self) -> int:
        if self._root_fd is None:
            self._root_fd = private_dir(self.root)
            self._take_back()
        return self._root_fd

    def close(self) -> None:
        if self._root_fd is not None:
            os.close(self._root_fd)
            self._root_fd = None

    def dir(self, job_id: str) -> Path:
        return self.root / ids.job_id(job_id)

    def path(self, job_id: str, stream: int) -> Path:
        """Where a stream's file is: a name for CRIU (--inherit-fd), not to be opened."""
        return self.dir(job_id) / STREAM_FILES[stream]

    @contextmanager
    def _dir(self, job_id: str, create: bool = False) -> Iterator[int]:
        """A job's spool directory, open; SpoolError if it is not the daemon's own."""
        ids.job_id(job_id)
        root = self._root()
        if create:
            try:
                os.mkdir(job_id, 0o700, dir_fd=root)
            except FileExistsError:
                pass
        fd = os.open(job_id, _DIR_FLAGS, dir_fd=root)
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid() or st.st_mode & 0o077:
                raise SpoolError(f"spool of job {job_id} is not this daemon's own (uid "
                                 f"{st.st_uid}, mode {st.st_mode & 0o777:o})")
            yield fd
        finally:
            os.close(fd)

    def _open(self, job_id: str, name: str, flags: int) -> int:
        with self._dir(job_id) as d:
            try:
                return open_private(name, flags, d)
            except SpoolError as e:
                log.warning("job %s: refused its spool file: %s", job_id, e)
                raise

    def create(self, job: Job) -> Path:
        """The job's spool directory and empty files, the daemon's own."""
        try:
            with self._dir(job.id, create=True) as d:
                for name in _SPOOL_FILES:
                    os.close(open_private(name, os.O_WRONLY | os.O_CREAT, d))
        except OSError as e:
            log.warning("job %s: its spool is refused: %s", job.id, e)
            raise JobError(f"job {job.id}: its spool cannot be used: {e}") from None
        return self.dir(job.id)

    def job_files(self, job_id: str) -> tuple[int, int, int]:
        """Descriptors for a starting or restored job: its stdout and stderr (appended),
        and its status file (see omuscd.jobs.jobinit).  The caller closes them."""
        fds: list[int] = []
        try:
            for name, flags in (("stdout", os.O_WRONLY | os.O_APPEND),
                                ("stderr", os.O_WRONLY | os.O_APPEND),
                                ("status", os.O_RDWR | os.O_CREAT)):
                fds.append(self._open(job_id, name, flags))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds[0], fds[1], fds[2]

    def open_stream(self, job_id: str, stream: int) -> int:
        """A stream's file, open for reading (the caller closes it)."""
        return self._open(job_id, STREAM_FILES[stream], os.O_RDONLY)

    def read(self, job_id: str, stream: int, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        try:
            fd = self.open_stream(job_id, stream)
        except (OSError, ValueError):
            return b""
        try:
            return os.pread(fd, end - start, start)
        except OSError:
            return b""
        finally:
            os.close(fd)

    def size(self, job_id: str, stream: int) -> int | None:
        """How long a stream's file is (None when it is missing or not a plain file)."""
        try:
            with self._dir(job_id) as d:
                st = os.stat(STREAM_FILES[stream], dir_fd=d, follow_symlinks=False)
        except (OSError, ValueError):
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def ends(self, job_id: str) -> dict[int, int]:
        """The size of each output file (0 for one that is missing): where what has
        arrived ends, and so where following the job's output goes on from."""
        return {stream: self.size(job_id, stream) or 0 for stream in STREAM_FILES}

    def append(self, job_id: str, stream: int, data: bytes) -> None:
        fd = self._open(job_id, STREAM_FILES[stream], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)

    def truncate(self, job_id: str, stream: int) -> None:
        fd = self._open(job_id, STREAM_FILES[stream], os.O_WRONLY | os.O_CREAT)
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)

    def status(self, job_id: str) -> str:
        """What the job's init wrote of its end ("" if nothing, or unreadable)."""
        try:
            fd = self._open(job_id, "status", os.O_RDONLY)
        except (OSError, ValueError):
            return ""
        try:
            with os.fdopen(fd, "rb") as f:
                return f.read(1 << 16).decode(errors="replace")
        except OSError:
            return ""

    @contextmanager
    def replacing(self, job_id: str, stream: int) -> Iterator[int]:
        """A new file for a stream (written by the caller, then put in place whole): at
        the home, readers of the output read the old one meanwhile."""
        part = f".{STREAM_FILES[stream]}.part"
        with self._dir(job_id) as d:
            _unlink(part, d)
            fd = open_private(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, d)
            try:
                yield fd
                os.rename(part, STREAM_FILES[stream], src_dir_fd=d, dst_dir_fd=d)
            finally:
                os.close(fd)
                _unlink(part, d)

    def tail_lines(self, job_id: str, stream: int, lines: int) -> list[str]:
        size = self.size(job_id, stream)
        if not size:
            return []
        text = self.read(job_id, stream, 0, size).decode(errors="replace").splitlines()
        return text[-lines:] if lines else text

    def remove(self, job_id: str) -> None:
        if not ids.is_job_id(job_id):
            return
        try:
            shutil.rmtree(job_id, dir_fd=self._root())
        except OSError:
            pass

    def save(self, job: Job) -> None:
        """Keep the home's record of a job beside its output (``job.json``), so that a
        restarted daemon knows its jobs again.  Written whole to a new file, then
        renamed."""
        data = json.dumps(job.wire()).encode()
        try:
            with self._dir(job.id) as d:
                _unlink(_RECORD_TMP, d)
                fd = open_private(_RECORD_TMP, os.O_WRONLY | os.O_CREAT | os.O_EXCL, d)
                try:
                    _write_all(fd, data)
                finally:
                    os.close(fd)
                os.rename(_RECORD_TMP, _RECORD, src_dir_fd=d, dst_dir_fd=d)
        except FileNotFoundError:
            return  # no spool here (any more)
        except OSError as e:
            log.warning("job %s: cannot keep its record: %s", job.id, e)

    def saved(self) -> list[dict[str, Any]]:
        """The records kept by :meth:`save`, oldest job first.  A record that is a link,
        is not the daemon's own, or names another job than its directory is refused."""
        out = []
        try:
            names = os.listdir(self._root())
        except OSError as e:
            log.warning("%s: cannot read the spool (%s); no job records", self.root, e)
            return out
        for name in sorted(filter(ids.is_job_id, names), key=job_order):
            try:
                fd = self._open(name, _RECORD, os.O_RDONLY)
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as e:
                log.warning("%s/%s: job record refused (%s); skipped", self.root, name, e)
                continue
            try:
                with os.fdopen(fd, "rb") as f:
                    rec = json.loads(f.read())
            except (OSError, ValueError) as e:
                log.warning("%s/%s: unreadable job record (%s); skipped", self.root, name, e)
                continue
            if not isinstance(rec, dict) or rec.get("id") != name:
                log.warning("%s/%s: job record of another job (%r); refused", self.root,
                            name, rec.get("id") if isinstance(rec, dict) else rec)
                continue
            out.append(rec)
        return out

    def _take_back(self) -> None:
        """At start: spool directories of an older version belonged to the job's user.
        Each becomes the daemon's again (0700), without following a link; a link or a
        special file found in it is removed (never followed); a job record the daemon
        did not write (not its own) is left for :meth:`saved` to refuse."""
        root = self._root_fd
        assert root is not None
        for name in os.listdir(root):
            try:
                st = os.stat(name, dir_fd=root, follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                log.warning("%s/%s: not a job's spool directory (a link or a file); "
                            "removed, not followed", self.root, name)
                _unlink(name, root)
                continue
            if st.st_uid == os.geteuid() and not st.st_mode & 0o077:
                continue
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=root)
            except OSError:
                continue
            try:
                os.fchown(fd, os.geteuid(), os.getegid())
                os.fchmod(fd, 0o700)
                log.info("%s/%s: spool of an older version taken back (it was uid %d's, "
                         "mode %o)", self.root, name, st.st_uid, st.st_mode & 0o777)
                for entry in os.listdir(fd):
                    self._take_back_file(name, entry, fd)
            finally:
                os.close(fd)

    def _take_back_file(self, job_dir: str, name: str, d: int) -> None:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=d)
        except OSError:  # a link (ELOOP) or gone
            fd = -1
        try:
            st = os.fstat(fd) if fd >= 0 else None
            if st is None or not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                log.warning("%s/%s/%s: a link or special file in a job's spool; removed, "
                            "not followed", self.root, job_dir, name)
                _unlink(name, d)
            elif name != _RECORD or st.st_uid == os.geteuid():
                os.fchown(fd, os.geteuid(), os.getegid())
                os.fchmod(fd, 0o600)
        finally:
            if fd >= 0:
                os.close(fd)


def _unlink(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
