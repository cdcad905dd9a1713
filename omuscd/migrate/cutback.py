"""Cutting the files a job writes back to the sizes they had at an instant the job stood
still: before a checkpoint is restored (:mod:`omuscd.migrate.revive`), and before the
source of a failed post-copy move resumes its frozen copy (:mod:`omuscd.migrate.source`),
so that what the job writes again after that instant is not in the file twice.

Run as the job's user (root's job: as root) through setpriv, with a fixed environment, by
a small script (:data:`CUT`) that never follows a link at a path's end: a user who made
the file a link to someone else's since gets a refusal, never that file truncated."""

from __future__ import annotations

import json
import os
import stat
from typing import Any

import trio

from omuscd import rootexec
from omuscd.jobs.record import STDERR, STDOUT, Job, JobError
from omuscd.jobs.spool import Spool
from omuscd.migrate.criu import SETPRIV
from omuscd.proctab import fds_of, tree

#: Cuts each file of ``argv[1]`` (JSON ``[[path, size], ...]``) back to its size, run as the
#: job's user: opened without following a link at its end (a link a user put there since
#: is refused, never truncated through), a regular file only, never made longer (one
#: shorter than noted is refused: the job's view of it cannot be restored).  With
#: ``argv[2] == "all"`` it goes on past a refused file and exits 1 naming every one
#: (one a line); else it stops at the first.
CUT = r"""
import json, os, stat, sys
refused = []
def cut(path, size):
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        return f"{path}: {e.strerror}"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return f"{path}: not a regular file any more"
        if st.st_size < size:
            return f"{path}: shorter ({st.st_size} bytes) than it was ({size})"
        if st.st_size > size:
            os.ftruncate(fd, size)
    except OSError as e:
        return f"{path}: {e.strerror}"
    finally:
        os.close(fd)
for path, size in json.loads(sys.argv[1]):
    why = cut(path, size)
    if why:
        if sys.argv[2:] != ["all"]:
            sys.exit(why)
        refused.append(why)
if refused:
    sys.exit("\n".join(refused))
"""


async def cut_back(job: Job, files: list[list[Any]], to: str = "the checkpoint",
                   every: bool = False) -> None:
    """Cut ``files`` (``[[path, size], ...]``) back to their sizes at ``to`` (named in
    the error), as the job's user, never through a link (see CUT).  JobError naming the
    first file refused, or with ``every``, after trying them all, naming each one
    refused."""
    if not files:
        return
    python = rootexec.need(rootexec.PYTHON, "python3")
    argv = [python, "-I", "-S", "-c", CUT, json.dumps(files), *(["all"] if every else [])]
    if job.owner.uid != 0:
        if SETPRIV is None:
            raise JobError("cutting back another user's files needs setpriv (util-linux)")
        groups = ",".join(str(g) for g in job.owner.groups)
        argv = [SETPRIV, "--reuid", str(job.owner.uid), "--regid", str(job.owner.gid),
                *(["--groups", groups] if groups else ["--clear-groups"]), "--", *argv]
    r = await trio.run_process(argv, capture_stdout=True, capture_stderr=True,
                               check=False, env=rootexec.HELPER_ENV, cwd="/")
    if r.returncode != 0:
        said = r.stderr.decode(errors="replace").strip().splitlines()
        why = "; ".join(said[-8:] if every else said[-1:]) or f"exit {r.returncode}"
        raise JobError(f"cannot cut its files back to {to}: {why}")


def spool_files(spool: Spool, job: Job) -> set[tuple[int, int]]:
    """The job's spool files (output, status) by device and inode: the daemon hands them
    to the job and keeps them itself, so they are never cut back."""
    ours: set[tuple[int, int]] = set()
    for p in (spool.path(job.id, STDOUT), spool.path(job.id, STDERR),
              spool.dir(job.id) / "status"):
        try:
            st = os.stat(p, follow_symlinks=False)
            ours.add((st.st_dev, st.st_ino))
        except OSError:
            pass
    return ours


def written_files(pids: list[int], skip: set[tuple[int, int]]) -> list[list[Any]]:
    """The regular files the processes hold open for writing, as ``[path, size]``, each
    once (not those in ``skip``, by device and inode: the job's own spool files, which
    the daemon hands it).  Read while the processes are stopped: the sizes of that
    instant, which a restore cuts the files back to."""
    seen: set[tuple[int, int]] = set(skip)
    out: list[list[Any]] = []
    for pid, fd in fds_of(pids):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                flags = next(int(ln.split()[1], 8) for ln in f if ln.startswith("flags:"))
            if flags & os.O_ACCMODE == os.O_RDONLY:
                continue
            st = os.stat(f"/proc/{pid}/fd/{fd}")  # the open file itself
            path = os.readlink(f"/proc/{pid}/fd/{fd}")
        except (OSError, StopIteration, ValueError, IndexError):
            continue
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in seen:
            continue
        if not path.startswith("/") or path.endswith(" (deleted)"):
            continue
        seen.add((st.st_dev, st.st_ino))
        out.append([path, st.st_size])
    return out


def written(spool: Spool, job: Job) -> list[list[Any]]:
    """The regular files the job's processes hold open for writing and their sizes (see
    :func:`written_files`), its spool files left out.  Read while the job stands still:
    the sizes to cut back to."""
    assert job.pid is not None
    return written_files(tree(job.pid)[1:], spool_files(spool, job))  # [0]: its init
