"""Cluster jobs: records, spool files and the supervisor of a running job.

A job is started on its *home node* (where ``omuscd run`` was typed) and runs on any node.
The home node keeps the authoritative record; the node running the job keeps a guest record
and the job's spool: ``STATE_DIR/spool/JOB/stdout``, ``stderr`` and ``status``.  Output lives
in files rather than pipes because a job must not share pipes with the daemon if it is ever
to be checkpointed and moved (CRIU); the home node keeps a copy of a remote job's output as
it streams in, so ``output`` and ``attach`` work there even if the other node dies.

Readers of output never get data pushed at them: they hold their own offsets and are woken
when a job's files grew, so a slow reader costs nothing and misses nothing.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import shutil
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import psutil
import trio

from omuscd import ids, proctab, rootexec

log = logging.getLogger("omuscd.jobs")

RUNNING, MIGRATING, EXITED, LOST = "running", "migrating", "exited", "lost"
MOVED = "moved"  # on the node a job left: its record there is finished
JOB_STATES = (RUNNING, MIGRATING, EXITED, LOST)
FINAL = (EXITED, LOST, MOVED)
STDOUT, STDERR = 1, 2
STREAM_FILES = {STDOUT: "stdout", STDERR: "stderr"}
JOBINIT = str(Path(__file__).with_name("jobinit.py"))
TAIL_MIN, TAIL_MAX = 0.01, 0.25  # seconds between looks at a job's output files
#: Free bytes below which the filesystem of a job's spool counts as full.  The job writes
#: its output itself, through descriptors it inherited, so only it sees ENOSPC; a write
#: that did not fit fails after filling what was left, so a filesystem it cut short has
#: less than one write's worth free afterwards (128 KiB: the largest buffer of cat and
#: of most stdio).  Looked at when a burst of output stops and when the job ends.
SPOOL_FULL_BELOW = 128 * 1024
KEEP_EXITED = 1000  # finished records kept per node


class JobError(Exception):
    """A job cannot be started or acted on; the message says why, for the user."""


@dataclass
class Owner:
    uid: int
    gid: int
    groups: list[int]
    user: str

    @classmethod
    def of_uid(cls, uid: int) -> Owner:
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            raise JobError(f"uid {uid} has no user on this node") from None
        groups = os.getgrouplist(pw.pw_name, pw.pw_gid)
        return cls(uid, pw.pw_gid, groups, pw.pw_name)


@dataclass
class Job:
    """One job's record (on its home node, or as a guest on the node running it)."""

    id: str
    owner: Owner
    home: int
    node: int
    node_name: str
    argv: list[str]
    cwd: str
    started: float = field(default_factory=time.time)
    state: str = RUNNING
    stay: bool = False
    restartable: bool = False
    stdin: bool = False
    cpu: float = 0.0
    rss_mb: float = 0.0
    migrations: int = 0
    cpu_moved: float = 0.0  # CPU seconds of its earlier stays (a restore restarts the count)
    exit: dict[str, Any] | None = None
    ended: float | None = None
    reason: str = ""  # why it was lost
    cannot_move: str = ""  # why it cannot move (filled in by the migration backend)
    offsets: dict[int, int] = field(default_factory=lambda: {STDOUT: 0, STDERR: 0})
    node_changed: bool = False  # set on the node a job left, so its end is not reported
    launcher: int | None = None  # the unshare process of a job started here (not restored)
    generation: int = 0  # bumped when a restartable job is rerun from the start elsewhere
    moves: list[dict[str, Any]] = field(default_factory=list)  # the last moves, and failures
    stdin_pipe: Any = field(default=None, repr=False)  # --stdin: where its input goes here
    run: int = 0  # this node's count of the job's stays here: only the current one ends it
    pid: int | None = None  # on the node running it: the job's init, seen from outside
    landed_at: float = field(default=0.0, repr=False)  # wall time it last arrived here
    cut: str = ""  # why its output may be incomplete (a full state filesystem), else ""
    changed: trio.Event = field(default_factory=trio.Event, repr=False)

    def new_stay(self) -> int:
        """The job runs here again (restored here): a new run, counted before the hand-over
        flag is cleared, so that the watcher of an earlier stay here, not yet woken, does
        not take the death of that stay's frozen copy for this one's end (a job brought
        back within a poll interval was reported killed by signal 9)."""
        self.run += 1
        self.node_changed = False
        return self.run

    def notify(self) -> None:
        """Wake everyone waiting for this job (output grew, state changed)."""
        self.changed.set()
        self.changed = trio.Event()

    def status_code(self) -> int:
        """The exit status a shell would show: the code, or 128+N for signal N."""
        if self.exit is None:
            return 0
        if "signal" in self.exit:
            return 128 + int(self.exit["signal"])
        return int(self.exit.get("code", 127))

    def exit_text(self) -> str:
        if self.exit is None:
            return ""
        if "signal" in self.exit:
            return f"killed by signal {self.exit['signal']}"
        if "error" in self.exit:
            return f"failed to start: {self.exit['error']}"
        return f"exit {self.exit['code']}"

    def _record(self) -> dict[str, Any]:
        """The plain fields (not ``asdict``: it would deep-copy the trio Event)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)
             if f.name not in ("changed", "stdin_pipe", "run", "landed_at")}
        d["owner"] = asdict(self.owner)
        d["argv"] = list(self.argv)
        d["exit"] = dict(self.exit) if self.exit else None
        return d

    def view(self) -> dict[str, Any]:
        d = {k: v for k, v in self._record().items() if k not in ("offsets", "pid")}
        d["owner"] = self.owner.user
        d["uid"] = self.owner.uid
        d["command"] = " ".join(self.argv)
        d["status"] = self.exit_text()
        d["cpu"] = round(self.cpu, 2)
        d["rss_mb"] = round(self.rss_mb, 1)
        return d

    def wire(self) -> dict[str, Any]:
        """The record as sent between daemons."""
        d = self._record()
        d["offsets"] = {str(k): v for k, v in self.offsets.items()}
        return d

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Job:
        """A record from a peer or from disk; ValueError (ids.BadId for an id) if its id,
        nodes or owner are not what they must be: a job id names a spool directory."""
        d = dict(d)
        ids.job_id(d.get("id"))
        ids.node_id(d.get("home"))
        ids.node_id(d.get("node"))
        owner = d.get("owner")
        if not isinstance(owner, dict) or not all(
                type(owner.get(k)) is int and owner[k] >= 0 for k in ("uid", "gid")):
            raise ValueError("a job record without a valid owner")
        d["owner"] = Owner(**d["owner"])
        d["offsets"] = {int(k): int(v) for k, v in d.get("offsets", {}).items()}
        d.pop("changed", None)
        d.pop("launcher", None)  # a pid means nothing on another node
        d.pop("stdin_pipe", None)
        d.pop("run", None)
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


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
        and its status file (see omuscd.jobinit).  The caller closes them."""
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


def job_order(job_id: str) -> tuple[int, int]:
    """Jobs in the order they were started (by home node, then number)."""
    home, _, n = job_id.partition(".")
    return (int(home) if home.isdigit() else 0, int(n) if n.isdigit() else 0)


def check_env(argv: list[str], env: dict[str, str]) -> None:
    """Refuse, with the reason, what exec cannot carry: a variable name that is empty or
    holds '=', a NUL anywhere, text that has no bytes (found here, not as an odd failure
    in the job's init)."""
    for name, value in env.items():
        if not name or "=" in name or not _exec_text(name):
            raise JobError(f"environment variable name {name[:40]!r} is not valid")
        if not _exec_text(value):
            raise JobError(f"environment variable {name[:40]!r} has a value exec cannot "
                           "carry (a NUL character or unencodable text)")
    if not all(_exec_text(word) for word in argv):
        raise JobError("the command has a word exec cannot carry (a NUL character or "
                       "unencodable text)")


def _exec_text(text: str) -> bool:
    try:
        return b"\0" not in os.fsencode(text)
    except UnicodeEncodeError:
        return False


def check_runnable(argv: list[str], cwd: str, env: dict[str, str], node: str,
                   owner: Owner | None = None) -> None:
    """Fail early, naming the node and the path, when the job cannot start here (omuscd
    assumes the same paths on every node: a shared home or NFS).

    This runs as root on the caller's paths and PATH, but only looks (stat, access): it
    opens and runs nothing.  The job's init runs the command as the caller, through the
    caller's PATH, and reports what that finds (see jobinit.start).  For another user's
    job it looks only where ``owner`` could look: root's answer about a path behind a
    directory that user may not search (does /root/x exist?) is left to the init, which
    answers as the user (else it would tell them what only root may know)."""
    check_env(argv, env)
    def hidden(path: str) -> bool:
        return owner is not None and owner.uid != 0 and not may_reach(path, owner)

    if not hidden(cwd) and not os.path.isdir(cwd):
        raise JobError(f"node {node}: working directory {cwd} does not exist")
    prog = argv[0]
    if "/" in prog:
        path = prog if os.path.isabs(prog) else os.path.join(cwd, prog)
        if hidden(path):
            return
        if not os.path.exists(path):
            raise JobError(f"node {node}: no such program {path}")
        if not os.access(path, os.X_OK) or os.path.isdir(path):
            raise JobError(f"node {node}: {path} is not executable")
        return
    search = env.get("PATH", os.defpath)
    if any(hidden(os.path.join(d or cwd, prog)) for d in search.split(os.pathsep)):
        return
    if shutil.which(prog, path=search) is None:
        raise JobError(f"node {node}: program {prog!r} not found in PATH {search}")


def may_reach(path: str, owner: Owner) -> bool:
    """Whether ``owner`` may search every directory on the way to ``path`` (after its
    links), by the permission bits (an ACL that grants more is not seen: that only
    leaves a check to the job's init)."""
    d = os.path.dirname(os.path.realpath(path))
    groups = {owner.gid, *owner.groups}
    while True:
        try:
            st = os.stat(d)
        except OSError:
            return True  # a missing directory: nothing behind it to tell
        if st.st_uid == owner.uid:
            bit = st.st_mode & 0o100
        elif st.st_gid in groups:
            bit = st.st_mode & 0o010
        else:
            bit = st.st_mode & 0o001
        if not bit:
            return False
        if d == "/":
            return True
        d = os.path.dirname(d)


def launch_argv(job: Job, cpus: list[int], status_fd: int, env_fd: int) -> list[str]:
    """``unshare --pid --fork`` then our init: the job gets its own PID namespace with its
    session leader inside it (setsid happens in the init, never outside).  Both run as
    root: absolute paths found at start (omuscd.rootexec), and the caller's environment
    only on ``env_fd``, for the command the init starts as the caller.

    Not ``--kill-child``: it gives the init a parent-death signal, which CRIU restores,
    and a restored init's parent is the daemon thread that ran criu; when trio retired
    that idle worker thread, the kernel killed the migrated job (found in the console's
    first session: jobs died ten seconds after a move)."""
    unshare = rootexec.need(rootexec.UNSHARE, "unshare")
    python = rootexec.need(rootexec.PYTHON, "python3")
    if os.geteuid() == 0:
        ns = [unshare, "--pid", "--fork"]
        uid, gid = str(job.owner.uid), str(job.owner.gid)
        groups = ",".join(str(g) for g in job.owner.groups)
    else:  # an unprivileged daemon: a user namespace makes the PID namespace possible
        ns = [unshare, "--user", "--map-current-user", "--pid", "--fork"]
        uid = gid = "-"
        groups = ""
    return [*ns, python, "-I", "-S", JOBINIT, str(status_fd), str(env_fd),
            ",".join(str(c) for c in cpus), uid, gid, groups, job.cwd, "--", *job.argv]


def init_pid(pid: int) -> int | None:
    """The first child of ``pid`` (the job's init is unshare's child; the command is the
    init's)."""
    try:
        children = psutil.Process(pid).children()
    except psutil.Error:
        return None
    return children[0].pid if children else None


def starting(job: Job) -> bool:
    """Whether a job started here is still starting: its init has not yet made itself
    the session leader and started the command.  CRIU cannot dump it then (the session
    leader is outside the job's PID namespace): the balancer, which may pick a job a
    tenth of a second old when eight share one CPU, froze such a job, failed and resumed
    it, and the room the other node held for it kept that node from offering more.
    A job restored or adopted here (no launcher) has started."""
    if job.launcher is None:
        return False
    pid = job.pid if job.pid is not None else init_pid(job.launcher)
    if pid is None:  # unshare has not forked the init yet
        return True
    try:
        if os.getsid(pid) != pid:
            return True
    except OSError:  # gone: it is ending, not starting
        return False
    return len(proctab.tree(pid)) < 2


def catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (its SigCgt mask); True when that
    cannot be read, so that the caller's kill says what is wrong."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return True


def refresh_usage(jobs: list[Job]) -> None:
    """CPU seconds and resident memory of the running jobs here, in one pass over the
    process table (done when someone asks for the job list, not on a timer)."""
    running = {j.pid: j for j in jobs if j.pid is not None and j.state == RUNNING}
    if not running:
        return
    for pid, below in proctab.descendants(proctab.scan(), set(running)).items():
        job = running[pid]
        cpu, job.rss_mb = _usage(below)
        job.cpu = job.cpu_moved + cpu


def measure(job: Job) -> None:
    """Bring a job running here up to date: CPU seconds of all its stays, resident MB."""
    if job.pid is not None:
        cpu, job.rss_mb = tree_usage(job.pid)
        job.cpu = job.cpu_moved + cpu


def tree_usage(pid: int) -> tuple[float, float]:
    """CPU seconds and resident MB of a job's processes below its init (``pid``): only
    theirs read (proctab.tree), not the whole process table, since it is measured while
    the job is frozen for a move."""
    procs = [p for q in proctab.tree(pid)[1:] if (p := proctab.read(q)) is not None]
    return _usage(procs)


def _usage(procs: list[proctab.Proc]) -> tuple[float, float]:
    return sum(p.cpu_seconds for p in procs), sum(p.rss for p in procs) / (1024 * 1024)


def env_file(env: dict[str, str]) -> int:
    """A descriptor of an anonymous in-memory file holding ``env`` (JSON), read from the
    start: how the caller's environment reaches the job's init, never through the
    environment (the init's interpreter and unshare run as root) nor its arguments (seen
    by every user in ps, and limited in size)."""
    fd = os.memfd_create("omuscd-env", os.MFD_CLOEXEC)
    try:
        data = json.dumps(env).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


async def supervise(job: Job, spool: Spool, env: dict[str, str], cpus: list[int],
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> bool:
    """Start ``job`` on this node and watch it until it ends (see :func:`watch`)."""
    job.run += 1
    run = job.run
    spool.create(job)
    try:  # the job writes through these: it has no access to the spool by path
        out, err, status = spool.job_files(job.id)
    except (OSError, ValueError) as e:
        raise JobError(f"cannot start the job: its spool: {e}") from None
    if job.stdin:  # fed by the daemon from the omuscd run client's standard input
        null, feed = os.pipe()
        os.set_blocking(feed, False)
        job.stdin_pipe = trio.lowlevel.FdStream(feed)
    else:
        null = os.open(os.devnull, os.O_RDONLY)
    env_fd = env_file(env)
    try:
        proc = await trio.lowlevel.open_process(
            launch_argv(job, cpus, status, env_fd), stdin=null, stdout=out, stderr=err,
            env=rootexec.HELPER_ENV, cwd="/", pass_fds=(status, env_fd))
    except OSError as e:
        raise JobError(f"cannot start the job: {e.strerror or e}") from None
    finally:
        os.close(out)
        os.close(err)
        os.close(null)
        os.close(status)
        os.close(env_fd)
    job.launcher = proc.pid
    for _ in range(200):  # unshare forks the init at once; give it a moment
        job.pid = init_pid(proc.pid)
        if job.pid is not None or proc.poll() is not None:
            break
        await trio.sleep(0.002)
    task_status.started()
    return await watch(job, spool, proc.poll, proc.wait, run)


async def adopt(job: Job, spool: Spool, pid: int, run: int) -> bool:
    """Watch stay ``run`` (see Job.new_stay) of a job restored here (CRIU made its init
    our child)."""
    job.pid = pid
    state: dict[str, int] = {}

    def poll() -> int | None:
        if "code" not in state:
            try:
                done, st = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, st = pid, 0
            if done:
                state["code"] = os.waitstatus_to_exitcode(st)
        return state.get("code")

    async def wait() -> None:
        while poll() is None:
            await trio.sleep(TAIL_MAX)

    return await watch(job, spool, poll, wait, run)


async def watch(job: Job, spool: Spool, poll: Any, wait: Any, run: int) -> bool:
    """Notice output as the job's files grow; at its end, record how it ended and return
    True.  A job that migrated away ends here without an exit (False): its record moved
    with it, and if it has come back since, that is another run, whose watcher reports.
    Cancellation (the daemon stopping) leaves the job running: it is not ours to kill."""
    generation = job.generation  # a rerun elsewhere makes this run history
    delay = TAIL_MIN
    burst = False  # output grew since the last look at the free space
    while True:
        if job.pid is None and job.launcher is not None:  # a slow fork of unshare
            job.pid = init_pid(job.launcher)
        if _poll_sizes(job, spool):
            job.notify()
            delay = TAIL_MIN
            burst = True
        else:
            delay = min(TAIL_MAX, delay * 2)
            if burst:  # output stopped: because the filesystem is full?
                burst = False
                job.cut = job.cut or spool_full(spool, job)
        if poll() is not None:
            break
        with trio.move_on_after(delay):
            await wait()
    if job.stdin_pipe is not None:
        await job.stdin_pipe.aclose()
        job.stdin_pipe = None
    # a process that dies while being dumped has ended (the move will fail); only a
    # completed hand-over (node_changed) or a newer stay makes its end not ours to record
    if job.state == MOVED or job.node_changed or job.run != run or job.generation != generation:
        return False
    _poll_sizes(job, spool)
    try:
        job.exit = json.loads(spool.status(job.id) or "null")
    except ValueError:
        job.exit = None
    if not isinstance(job.exit, dict):
        job.exit = None
    if job.exit and "cpu" in job.exit:
        job.cpu = job.cpu_moved + float(job.exit.pop("cpu"))
    if not job.exit:
        code = poll() or 0
        job.exit = {"signal": -code} if code < 0 else {"code": code}
    job.cut = job.cut or spool_full(spool, job)
    if job.cut and isinstance(job.exit, dict):  # travels home with the exit, and ends
        job.exit["cut"] = job.cut  # 'omuscd run' with a status of its own
    job.state, job.ended = EXITED, time.time()
    job.notify()
    return True


def spool_full(spool: Spool, job: Job) -> str:
    """Why the job's output may be incomplete, or '': the filesystem of its spool has
    less than :data:`SPOOL_FULL_BELOW` free for the job's user (root may use the blocks
    a filesystem reserves).  One statvfs: cheap enough for every burst of output."""
    try:
        st = os.statvfs(spool.dir(job.id))
    except OSError:
        return ""
    free = (st.f_bfree if job.owner.uid == 0 else st.f_bavail) * st.f_frsize
    if free >= SPOOL_FULL_BELOW:
        return ""
    log.warning("job %s: the filesystem of %s is full (%d KiB free): its output may be "
                "cut short", job.id, spool.root, free // 1024)
    return (f"the state filesystem of node {job.node_name} ({spool.root}) is full "
            f"({free // 1024} KiB free)")


def _poll_sizes(job: Job, spool: Spool) -> bool:
    grew = False
    for stream in STREAM_FILES:
        size = spool.size(job.id, stream)
        if size is not None and size > job.offsets[stream]:
            job.offsets[stream] = size
            grew = True
    return grew
