"""What a restored job holds that its user could not have opened.

Why: CRIU restores a job's open files, mappings and working directories by their path,
as root, with root's rights.  The path is the one the file had at the dump; the user may
change what it leads to before the restore (a directory of theirs made a link to one of
root's), so the restored job could hold, say, /etc/passwd open for writing.  After the
restore, while the job is still stopped, every file its processes hold is checked with
its user's rights (permission bits, and every directory on its way searchable); one that
fails fails the move, and the job resumes at the source.  The job's init is left out: the
daemon opened its files (the spool's, given to CRIU) and chose its interpreter.
"""

from __future__ import annotations

import os
import stat

from omuscd.jobs.process import may_reach
from omuscd.jobs.record import Owner
from omuscd.proctab import fds_of

_R, _W, _X = 4, 2, 1


def _allowed(st: os.stat_result, owner: Owner) -> int:
    """The permission bits (rwx) the file's mode gives ``owner``."""
    if st.st_uid == owner.uid:
        return st.st_mode >> 6 & 7
    if st.st_gid in {owner.gid, *owner.groups}:
        return st.st_mode >> 3 & 7
    return st.st_mode & 7


def _fd_need(pid: int, fd: str) -> int:
    """The rights the open flags of ``fd`` need: read, write or both (O_PATH: none)."""
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        flags = next(int(ln.split()[1], 8) for ln in f if ln.startswith("flags:"))
    if flags & os.O_PATH:
        return 0
    mode = flags & os.O_ACCMODE
    return _R if mode == os.O_RDONLY else _W if mode == os.O_WRONLY else _R | _W


def _refused(path: str, st: os.stat_result, need: int, owner: Owner) -> str | None:
    """Why ``owner`` could not hold ``path`` (the file ``st``) with the rights ``need``."""
    deleted = path.endswith(" (deleted)")
    if deleted:
        path = path[: -len(" (deleted)")]
    elif not may_reach(path, owner):
        return f"{path} lies behind a directory {owner.user} may not search"
    if need & ~_allowed(st, owner):
        what = "".join(c for b, c in ((_R, "r"), (_W, "w"), (_X, "x")) if need & b)
        return f"{path} is not {owner.user}'s to open ({what})"
    return None


def _held(pid: int) -> list[tuple[str, str, int]]:
    """What process ``pid`` holds by path: (its /proc entry, the path, the rights needed)."""
    held = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        entry = f"/proc/{pid}/fd/{fd}"
        path = os.readlink(entry)
        if path.startswith("/"):  # not a pipe, socket or anonymous inode
            held.append((entry, path, _fd_need(pid, fd)))
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith("/"):
                need = _R | (_W if parts[1][1] == "w" and parts[1][3] == "s" else 0)
                held.append((f"/proc/{pid}/map_files/{parts[0]}", parts[5].rstrip("\n"),
                             need))
    for name in ("cwd", "root"):
        held.append((f"/proc/{pid}/{name}", os.readlink(f"/proc/{pid}/{name}"), _X))
    return held


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def beyond_user(pids: list[int], owner: Owner, exempt: set[tuple[int, int]]) -> str | None:
    """The first thing the processes ``pids`` hold (files, mappings, working and root
    directories) that ``owner`` could not have opened, or None; files whose (device,
    inode) is in ``exempt`` (the daemon's own) are not looked at."""
    if owner.uid == 0:
        return None
    for pid in pids:
        try:
            held = _held(pid)
        except OSError as e:
            if _zombie(pid):  # ended, not yet reaped (restored as it was dumped): holds
                continue      # nothing, and its cwd and files cannot be read
            return f"cannot look at restored process {pid}: {e.strerror}"
        for entry, path, need in held:
            try:
                st = os.stat(entry)
            except OSError:
                continue  # a mapping or file gone meanwhile
            if (st.st_dev, st.st_ino) in exempt or stat.S_ISSOCK(st.st_mode):
                continue
            why = _refused(path, st, need, owner)
            if why is not None:
                return f"process {pid}: {why}"
    return None


def bound_by_path(pids: list[int], owner: tuple[int, int]) -> str | None:
    """A Unix socket of the job bound at a path that its user could lead elsewhere, or
    None: checked before a move is frozen (see Criu.cannot_move).

    Why: CRIU binds a restored Unix socket again at its path, as root.  Where a directory
    on that path is the user's (or one they may rename things in), they could make it a
    link to one of root's between the dump and the restore, and root would create a
    socket there (an empty /etc/nologin keeps everyone out).  A socket whose directories
    only root may change is left to CRIU (it unlinks a stale name; bind never follows a
    link at the last step)."""
    uid, _gid = owner
    bound: dict[str, str] = {}
    try:
        with open("/proc/net/unix") as f:
            next(f, None)
            for line in f:
                parts = line.split(maxsplit=7)
                if len(parts) == 8 and parts[7].startswith("/"):
                    bound[parts[6]] = parts[7].strip()
    except OSError:
        return None
    if not bound:
        return None
    for pid, fd in fds_of(pids):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and (path := bound.get(target[8:-1])):
            if _user_may_redirect(os.path.dirname(path), uid):
                return (f"process {pid} has a Unix socket bound at {path}, in a directory "
                        "its user could change: CRIU would bind it again there as root")
    return None


def _user_may_redirect(directory: str, uid: int) -> bool:
    """Whether ``uid`` owns, or may rename entries of, a directory on the way to (and
    including) ``directory``: one it could replace with a link."""
    d = directory
    while True:
        try:
            st = os.lstat(d)
        except OSError:
            return True  # gone or unreadable: assume the worst
        sticky = bool(st.st_mode & stat.S_ISVTX)
        if st.st_uid == uid or stat.S_ISLNK(st.st_mode) or \
                (st.st_mode & 0o002 and not sticky):
            return True
        if d == "/":
            return False
        d = os.path.dirname(d)
