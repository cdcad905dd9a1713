"""CRIU as the mechanism that moves a job (checkpoint/restore in user space).

Driven as ``criu dump --leave-stopped`` on the source (the job stays frozen until the target
confirms) and ``criu restore --restore-detached --restore-sibling --leave-stopped`` on the
target (the restored init becomes this daemon's child, stopped until the hand-over
commits), each a CRIU service worker started before the job is frozen and given its
request once it is (see omuscd.migrate.swrk: a process start less in the freeze, twice).
Page servers and lazy-pages run from its command line.  The job's output and status files
are handed to CRIU with ``--inherit-fd``, so the restored job writes to this node's spool.
Traps from CRIU's own tracker handled here or around: PIDs clash unless the job has its own
PID namespace (it does); files must exist at the same path on the target (the shared
filesystem, and ``--inherit-fd`` for the spool); the session leader is inside the namespace
(the job init).

Another user's job is dumped by a root CRIU with that user's *real* uid and gid (``setpriv
--ruid --rgid``; its effective ids and capabilities stay root's): CRIU reads every task's
limits, which the kernel allows to a caller without CAP_SYS_RESOURCE (a container's root)
only if its real ids are the task's; the job's init has become that user for this (see
omuscd.jobinit.drop_init).  The user may signal that CRIU (they share its real uid): they
can only spoil their own job's move, which a bounded dump turns into a resumed job.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import psutil
import trio

from omuscd import proctab, rootexec
from omuscd.migrate import Inherit, MoveError, swrk
from omuscd.migrate.dumplock import DumpLock
from omuscd.migrate.locks import FileLock, LockLender, lock_problem, read_locks
from omuscd.migrate.reopened import bound_by_path
from omuscd.priority import make_realtime
from omuscd.proctab import tree

log = logging.getLogger("omuscd.migrate")

#: Where ``tests/install-criu`` puts Debian 13's criu on a Debian 12 machine.
PRIVATE_CRIU = "/var/cache/omuscd-criu/bin/criu"
MIN_MAJOR = 4
#: Changes only the real ids of the CRIU it runs (util-linux, like unshare).
SETPRIV = rootexec.find("setpriv")


def _has_resource_cap() -> bool:
    """Whether this process may read any process's limits (CAP_SYS_RESOURCE, bit 24);
    without it (some containers), only those of a process with its real ids."""
    try:
        with open("/proc/self/status") as f:
            eff = next(ln.split()[1] for ln in f if ln.startswith("CapEff:"))
        return bool(int(eff, 16) >> 24 & 1)
    except (OSError, StopIteration, ValueError):
        return False


RESOURCE_CAP = _has_resource_cap()
#: How long a dump may take: this, plus a second for each DUMP_RATE bytes the job holds.
#: Its user can stop a CRIU that has their real uid; the job resumes when this is over.
DUMP_SECONDS = 60.0
DUMP_RATE = 10 << 20
#: Where CRIU keeps what it found out about the kernel (KDAT_RUNDIR, fixed at its build).
KDAT_DIR = Path("/run")
#: Every dump of this daemon takes turns with the others on the machine.
DUMPS = DumpLock()
KDAT_NAME = "criu.kdat"
#: What CRIU writes (images: a job's memory; logs) is for no one but the daemon.  A
#: restored job gets its own umask back from its images.
PRIVATE_UMASK = 0o077
# CRIU reads the cache from KDAT_DIR whatever the filesystem, but writes it only to a
# tmpfs (so that a reboot into another kernel drops it).  Here it is probed in a private
# mount namespace with a tmpfs over /run, and the result copied out.
_PROBE = ('mount -t tmpfs omuscd-kdat /run && "$0" check >/dev/null 2>&1; '
          'exec cat /run/criu.kdat')


def fs_type(path: Path) -> str:
    """The type of the filesystem ``path`` is on, from /proc/self/mountinfo."""
    target = os.path.realpath(path)
    best, kind = "", ""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                point = left.split()[4].replace("\\040", " ")
                inside = target == point or target.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, right.split()[0]
    except (OSError, IndexError):
        return ""
    return kind


def find_criu(given: str | None) -> str | None:
    if given:
        return given
    for candidate in (rootexec.find("criu"), PRIVATE_CRIU):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


#: Errors CRIU logs on every run here that do not make it fail: root in a container lacks
#: CAP_SYS_RESOURCE, so CRIU cannot raise its own open-files limit, and goes on.
HARMLESS = ("RLIMIT_NOFILE",)
#: CRIU's closing summary ("Dumping FAILED."): the effect, not the cause
SUMMARY = ("FAILED.", "FAILED")


def _harmless(line: str) -> bool:
    return any(h in line for h in HARMLESS)


def _cause(lines: list[str]) -> str:
    """The error that made CRIU fail: its first ``Error (`` line (``pr_err``; not a
    ``Warn`` line that mentions an error), not a harmless one, not the closing summary;
    else the last line."""
    errors = [ln for ln in lines if "Error (" in ln and not _harmless(ln)]
    causes = [ln for ln in errors if not ln.rstrip().endswith(SUMMARY)] or errors
    return (causes[0] if causes else (lines[-1] if lines else "no log")).strip()[:300]


def _first_error(logfile: Path) -> str:
    """The cause, not CRIU's closing "FAILED" summary nor a harmless error before it."""
    try:
        lines = logfile.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    return _cause(lines)


def keep(logfile: Path, dest: Path) -> bool:
    """Copy a failed step's log to ``dest`` (mode 0600: it tells of another user's job),
    starting with the cause (a first line ``omuscd: the cause: ...``), the harmless
    errors marked as such: the log's own first error is often a harmless one, which
    sent readers the wrong way."""
    try:
        lines = logfile.read_text(errors="replace").splitlines()
        head = [f"omuscd: the cause: {_cause(lines)}",
                f"omuscd: lines marked 'harmless:' do not make CRIU fail ({', '.join(HARMLESS)})",
                "omuscd: CRIU's log follows", ""]
        body = [f"harmless: {ln}" if "Error (" in ln and _harmless(ln) else ln for ln in lines]
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(fd, 0o600)
            f.write("\n".join(head + body) + "\n")
    except OSError:
        return False
    return True


def real_ids(pid: int) -> tuple[int, int] | None:
    """The real uid and gid of process ``pid`` (None if it is gone)."""
    uid = gid = None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    uid = int(line.split()[1])
                elif line.startswith("Gid:"):
                    gid = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None if uid is None or gid is None else (uid, gid)


def resident(pid: int) -> int:
    """The bytes the processes of ``pid``'s tree hold in memory."""
    return sum(p.rss for q in tree(pid) if (p := proctab.read(q)) is not None)


def _identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


async def _ask(worker: swrk.Worker, kind: int, images: Path, what: str, limit: float,
               options: Callable[[int], bytes], keep_log: Callable[[Path, str], str],
               notified: Callable[[swrk.Response], Awaitable[None]] | None = None
               ) -> swrk.Response:
    """Have ``worker`` do ``what`` (``options``: given a descriptor of ``images``);
    killed after ``limit`` seconds (MoveError, as for any failure, naming CRIU's first
    error; ``keep_log`` keeps its log); ``notified``: see swrk.Worker.call."""
    logfile = images / f"{what}.log"
    started = trio.current_time()
    # real-time from now, not while it started (it would have taken the CPU from this
    # daemon then): see omuscd.priority
    make_realtime(worker.proc.pid, worker.cpus)
    fd = swrk.open_dir(images)
    try:
        answer = await worker.call(kind, options(fd), limit, notified)
    except MoveError as e:
        raise MoveError(f"criu {what} {e}{keep_log(logfile, what)}") from None
    finally:
        os.close(fd)
    log.debug("criu %s: %.3fs", what, trio.current_time() - started)
    if answer is not None and answer.success:
        return answer
    kept = keep_log(logfile, what)
    cause = _first_error(logfile)
    if cause == "no log":  # it stopped before logging: what did it say?
        cause = (answer.error if answer is not None and answer.error else
                 f"exit {worker.proc.returncode}: {worker.said_last() or 'nothing said'}")
    raise MoveError(f"criu {what} failed: {cause}{kept}")


async def _start(criu: str, args: list[str], logfile: Path, pages: int) -> Starting:
    """Start the CRIU server ``criu`` (``args``; its log ``logfile``) given the socket
    ``pages``; it says when it is ready on a pipe (--status-fd).  In a process group of
    its own, killed whole (see Starting.kill): a process it forked must not outlive it."""
    r, w = os.pipe()
    command = [criu, *args, "--status-fd", str(w), "-o", logfile.name, "-v2"]
    try:
        proc = await trio.lowlevel.open_process(
            command, pass_fds=(w, pages), stdin=subprocess.DEVNULL, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=rootexec.HELPER_ENV, umask=PRIVATE_UMASK)
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    return Starting(proc, r, logfile, args[0])


#: How often Starting.ready calls its ``meanwhile``.
POLL_STEP = 0.001


class Starting:
    """A CRIU server just started (see _start): :meth:`ready` once it says it is;
    whoever started it calls :meth:`ready` or :meth:`abandon`."""

    def __init__(self, proc: trio.Process, status: int, logfile: Path, what: str):
        self.proc = proc
        self.status = trio.lowlevel.FdStream(status)  # its --status-fd, read here
        self.logfile = logfile
        self.what = what

    async def ready(self, timeout: float = 10.0,
                    meanwhile: Callable[[], bool] | None = None) -> trio.Process:
        """The process, once it said it is ready; MoveError (and killed) if it did not
        within ``timeout`` seconds.  ``meanwhile``: called every millisecond until then,
        or until it returns False (its work is done: no more waking every millisecond;
        see omuscd.migrate.gate)."""
        deadline = trio.current_time() + timeout
        try:
            while trio.current_time() < deadline:
                step = deadline if meanwhile is None else trio.current_time() + POLL_STEP
                with trio.move_on_at(min(step, deadline)) as waited:
                    said = await self.status.receive_some(1)
                if not waited.cancelled_caught:
                    if said:
                        return self.proc
                    break  # it ended without saying so
                if meanwhile is not None and not meanwhile():
                    meanwhile = None
        finally:
            await self.status.aclose()
        await self.abandon()
        raise MoveError(f"criu {self.what} did not start: {_first_error(self.logfile)}")

    def kill(self) -> None:
        """Kill it and whatever it forked (its process group), unless it is collected
        already (its pid, and so its group's, may then be another's)."""
        if self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    async def abandon(self) -> None:
        """Not needed after all: killed and collected."""
        self.kill()
        if self.proc.returncode is None:
            self.proc.kill()
        with trio.CancelScope(shield=True):
            await self.proc.wait()
            await self.status.aclose()


class Criu:
    name = "criu"

    def __init__(self, path: str | None, keep_logs: Path | None = None):
        self.path = path
        self.version = ""
        self.reason = "not checked yet"
        self.keep_logs = keep_logs  # where the log of a failed dump or restore is kept
        # the feature cache written here: where, and its identity (inode and time: an inode
        # number alone is soon reused by another daemon's cache on this machine)
        self.kdat: tuple[Path, tuple[int, int]] | None = None
        self.kdat_data = b""  # its contents, to write it again should it go
        self.uffd = False  # the kernel lets CRIU restore lazily (post-copy)
        # the locks taken off a frozen job for its move (see locks.LockLender)
        self.locks = LockLender(keep_logs)

    @property
    def available(self) -> bool:
        return bool(self.version)

    @property
    def streams(self) -> bool:
        """Whether dumps can stream pages to the target (CRIU's page server)."""
        return self.available

    @property
    def lazy(self) -> bool:
        """Whether a restore can leave the memory to come later (post-copy): CRIU's
        lazy-pages needs the kernel's non-cooperative userfaultfd."""
        return self.available and self.uffd

    def describe(self) -> str:
        return f"criu {self.version}" if self.version else f"off ({self.reason})"

    async def check(self) -> None:
        """At start: CRIU >= 4 that passes ``criu check``, or the reason it is off."""
        if os.geteuid() != 0:
            self.reason = "the daemon is not root (CRIU needs root)"
            return
        if not self.path:
            self.reason = "no CRIU on this node (install criu >= 4, or run tests/install-criu)"
            return
        try:
            v = await trio.run_process([self.path, "--version"], capture_stdout=True,
                                       capture_stderr=True, check=False,
                                       env=rootexec.HELPER_ENV)
            text = v.stdout.decode(errors="replace")
            version = next((ln.split()[1] for ln in text.splitlines()
                            if ln.startswith("Version:")), "")
            if not version or int(version.split(".")[0]) < MIN_MAJOR:
                self.reason = f"{self.path} is criu {version or '?'}; need >= {MIN_MAJOR}"
                return
            c = await trio.run_process([self.path, "check"], capture_stdout=True,
                                       capture_stderr=True, check=False,
                                       env=rootexec.HELPER_ENV)
        except (OSError, ValueError) as e:
            self.reason = f"cannot run {self.path}: {e}"
            return
        if c.returncode != 0:
            out = (c.stderr or c.stdout).decode(errors="replace").strip().splitlines()
            self.reason = f"'criu check' failed: {out[-1] if out else c.returncode}"
            return
        self.version = version
        self.reason = ""
        self._check_wrapper()
        await self.keep_features()
        try:
            u = await trio.run_process([self.path, "check", "--feature", "uffd-noncoop"],
                                       capture_stdout=True, capture_stderr=True, check=False,
                                       env=rootexec.HELPER_ENV)
            self.uffd = u.returncode == 0
        except OSError:
            self.uffd = False
        if not self.uffd:
            log.info("criu: this kernel has no non-cooperative userfaultfd: jobs move with "
                     "their memory inside the freeze here (no post-copy)")

    def _check_wrapper(self) -> None:
        """Say so if CRIU is a shell script that gives up root when run with another real
        uid (dash does, unless started with -p): other users' jobs would not move."""
        try:
            with open(self.path or "", "rb") as f:
                first = f.readline(100).split()
        except OSError:
            return
        if first[:1] in ([b"#!/bin/sh"], [b"#!/bin/dash"]) and b"-p" not in first:
            log.warning("criu: %s is a script run by %s without -p, which drops root when "
                        "it dumps another user's job: those jobs cannot move (make its "
                        "first line '%s -p'; tests/install-criu does)", self.path,
                        first[0][2:].decode(), first[0].decode())

    async def keep_features(self, where: Path = KDAT_DIR) -> None:
        """Have CRIU find out what the kernel can do once, not at every dump and restore.

        Where /run is a tmpfs (a standard Debian) CRIU keeps that itself.  Where it is not
        (some virtual machines, containers with /run on overlayfs) CRIU probed the kernel
        afresh in every dump, page server and restore, creating and destroying a network
        namespace each time: measured here, 10 ms of CPU and 25 ms of a job's frozen time
        per CRIU run, a move taking 0.15 s instead of 0.075 s.  So the probe runs once at
        start and its result goes where CRIU looks for it; it is made anew at every start
        (after a reboot into another kernel, too) and removed when the daemon stops."""
        if fs_type(where) in ("tmpfs", "") or self.path is None:
            return
        try:
            r = await trio.run_process(
                [rootexec.need(rootexec.UNSHARE, "unshare"), "--mount", "--propagation",
                 "private", rootexec.need(rootexec.SH, "sh"), "-c", _PROBE, self.path],
                capture_stdout=True, capture_stderr=True, check=False, env=rootexec.HELPER_ENV)
        except OSError as e:
            log.info("criu: cannot keep its kernel features (%s); it probes them at "
                     "every dump and restore", e)
            return
        if r.returncode != 0 or len(r.stdout) < 16:
            said = r.stderr.decode(errors="replace").strip().splitlines()
            log.info("criu: cannot keep its kernel features (%s); it probes them at "
                     "every dump and restore", said[-1] if said else f"exit {r.returncode}")
            return
        self.kdat_data = r.stdout
        if not self._write_features(where):
            return
        log.info("criu: %s is not a tmpfs, where CRIU would keep what it knows of the "
                 "kernel; probed once, kept in %s until this daemon stops", where,
                 where / KDAT_NAME)

    def _write_features(self, where: Path) -> bool:
        """Put the probed feature cache where CRIU looks for it (atomically)."""
        dest = where / KDAT_NAME
        tmp = where / f".{KDAT_NAME}.omuscd-{os.getpid()}"
        try:
            tmp.write_bytes(self.kdat_data)
            os.chmod(tmp, 0o600)
            os.replace(tmp, dest)
            self.kdat = (dest, _identity(dest))
        except OSError as e:
            tmp.unlink(missing_ok=True)
            log.info("criu: cannot write %s: %s", dest, e.strerror)
            return False
        return True

    def close(self) -> None:
        """Remove the feature cache written at start, unless another daemon on this
        machine has written its own since."""
        if self.kdat is None:
            return
        path, identity = self.kdat
        self.kdat = None
        try:
            if _identity(path) == identity:
                path.unlink()
        except OSError:
            pass

    def reasons(self, init_pids: list[int]) -> dict[int, str | None]:
        """:meth:`cannot_move` for several jobs, reading the machine's locks once."""
        locks = read_locks()
        return {pid: self.cannot_move(pid, locks) for pid in init_pids}

    def cannot_move(self, init_pid: int, locks: list[FileLock] | None = None) -> str | None:
        """What CRIU is known to refuse, found before anything is frozen (``locks``: this
        machine's, if just read)."""
        pids = tree(init_pid)
        if not pids:
            return "the job has no process here"
        why = self._cannot_move(init_pid, pids)
        return why or lock_problem(pids, read_locks() if locks is None else locks)

    def _cannot_move(self, init_pid: int, pids: list[int]) -> str | None:
        owner = real_ids(init_pid)
        for pid in pids:
            try:
                p = psutil.Process(pid)
                with open(f"/proc/{p.pid}/status") as f:
                    status = dict(ln.split(":", 1) for ln in f if ":" in ln)
                tracer = status.get("TracerPid", "0").strip()
                if tracer != "0":
                    return f"process {p.pid} is being traced (by pid {tracer})"
                ids = ({int(x) for x in status["Uid"].split()[:3]},
                       {int(x) for x in status["Gid"].split()[:3]})
                if not RESOURCE_CAP and owner and ids != ({owner[0]}, {owner[1]}):
                    return (f"process {p.pid} runs with other user or group ids than the "
                            f"job's (a set-user-ID or set-group-ID program?): uids "
                            f"{sorted(ids[0])}, gids {sorted(ids[1])}; CRIU reads its "
                            f"limits, which root without CAP_SYS_RESOURCE may not here")
                for c in p.net_connections(kind="tcp"):
                    if c.status == psutil.CONN_ESTABLISHED and c.raddr:
                        return (f"process {p.pid} has an established TCP connection to "
                                f"{c.raddr.ip}:{c.raddr.port}")
                for fd in os.listdir(f"/proc/{p.pid}/fd"):
                    target = os.readlink(f"/proc/{p.pid}/fd/{fd}")
                    if target == "anon_inode:[io_uring]":
                        return f"process {p.pid} uses io_uring"
                with open(f"/proc/{p.pid}/maps") as f:
                    maps = f.read()
                if " /dev/" in maps or " /SYSV" in maps:  # (most jobs: a look, not a parse)
                    for line in maps.splitlines():
                        parts = line.split(maxsplit=5)
                        path = parts[5].strip() if len(parts) > 5 else ""
                        if path.startswith("/dev/shm/") or path.startswith("/SYSV"):
                            return f"process {p.pid} maps shared memory ({path})"
                        if path.startswith("/dev/") and path != "/dev/zero":
                            return f"process {p.pid} maps a device ({path})"
            except (OSError, psutil.Error):
                continue
        if owner and owner != (0, 0):  # another user's job: what CRIU redoes as root
            return bound_by_path(pids, owner)
        return None

    def cannot_adopt(self, pid: int) -> str | None:
        try:
            p = psutil.Process(pid)
            procs = [psutil.Process(c) for c in tree(pid)] or [p]
            mine = psutil.Process(os.getpid())
            ancestors = {a.pid for a in mine.parents()} | {mine.pid}
            sid = os.getsid(pid)
        except (psutil.Error, OSError):
            return "no such process"
        if pid == 1 or pid in ancestors:
            return "it is PID 1, this daemon or one of its ancestors"
        if p.ppid() == 2 or pid == 2:
            return "it is a kernel thread"
        if any(c.pid in ancestors for c in procs):
            return "this daemon runs inside it"
        if sid not in {c.pid for c in procs}:
            return (f"its session leader (PID {sid}) is not part of it: start it with "
                    "setsid (CRIU restores whole sessions only)")
        for c in procs:
            try:
                for fd in os.listdir(f"/proc/{c.pid}/fd"):
                    target = os.readlink(f"/proc/{c.pid}/fd/{fd}")
                    if target.startswith(("/dev/pts/", "/dev/tty")) or target == "/dev/console":
                        return f"process {c.pid} has a terminal open ({target})"
            except OSError:
                continue
        return self.cannot_move(pid)

    def keep_log(self, logfile: Path, what: str) -> str:
        """Keep the log of a failed step as STATE_DIR/criu-WHAT-failed.log; says where."""
        if self.keep_logs is None or not logfile.exists():
            return ""
        dest = self.keep_logs / f"criu-{what}-failed.log"
        return f" (full log: {dest})" if keep(logfile, dest) else ""

    async def prepare_dump(self, init_pid: int, images: Path,
                           pages: int | None = None) -> swrk.Worker:
        """Start the CRIU that will dump the job (see omuscd.migrate.swrk), before it is
        frozen: with the job's real ids, on its CPUs, real-time, holding ``pages`` (a
        connected socket: the page server at its other end) at the same number."""
        assert self.path is not None
        try:
            cpus = os.sched_getaffinity(init_pid)
        except OSError:
            cpus = None
        worker = await swrk.Worker.start(self.path, await self._as_owner(init_pid),
                                         () if pages is None else (pages,),
                                         images / "dump-output.log", PRIVATE_UMASK)
        worker.cpus = cpus  # made real-time there once it has work (see _ask)
        return worker

    async def dump(self, init_pid: int, images: Path, pages: int | None = None,
                   worker: swrk.Worker | None = None, running: bool = False) -> None:
        """``worker``: from :meth:`prepare_dump` with the same ``pages`` (else started
        now); ``running``: a checkpoint: the job goes on (--leave-running), its locks
        stay."""
        if worker is None:
            worker = await self.prepare_dump(init_pid, images, pages)
        limit = DUMP_SECONDS + resident(init_pid) / DUMP_RATE
        # --file-locks: the job's locks go with it (see FileLock)
        async with DUMPS.held():  # one at a time (see omuscd.migrate.dumplock)
            await _ask(worker, swrk.DUMP, images, "dump", limit,
                       lambda fd: swrk.dump_options(init_pid, fd, "dump.log", pages, running),
                       self.keep_log)
        if not running:
            self.lend(init_pid)

    def lend(self, init_pid: int) -> None:
        """Take the locks of the job just dumped (frozen) off it (see locks.LockLender)."""
        self.locks.lend(init_pid)

    async def relock(self, init_pid: int) -> None:
        """The move failed: give the frozen job back the locks lent for it."""
        await self.locks.relock(init_pid)

    async def _as_owner(self, init_pid: int) -> tuple[str, ...]:
        """The prefix that runs CRIU with the real ids of the job whose init is
        ``init_pid`` (see the module's doc); nothing for root's jobs."""
        ids = real_ids(init_pid)
        if ids is None or ids == (0, 0):
            return ()
        if SETPRIV is None:
            raise MoveError("moving another user's job needs setpriv (util-linux)")
        await self._features_known()
        uid, gid = ids
        return (SETPRIV, "--ruid", str(uid), "--rgid", str(gid), "--keep-groups", "--")

    async def _features_known(self) -> None:
        """Make sure CRIU's cache of the kernel's features exists: a CRIU whose real uid is
        not root cannot probe them (creating namespaces), and another daemon on this
        machine may have removed the cache it wrote.  A stat, unless it is missing."""
        if (KDAT_DIR / KDAT_NAME).exists():
            return
        log.info("criu: %s is missing; writing it again", KDAT_DIR / KDAT_NAME)
        if self.kdat_data:  # probed at start
            self._write_features(KDAT_DIR)
            return
        try:  # on a tmpfs CRIU keeps them itself, once it probed them as root
            await trio.run_process([self.path, "check"], capture_stdout=True,  # type: ignore
                                   capture_stderr=True, check=False)
        except OSError as e:
            log.info("criu: cannot probe the kernel's features: %s", e)

    async def page_server(self, images: Path, pages: int) -> trio.Process:
        """Start a page server that writes the pages of one dump, read from the connected
        socket ``pages``, into ``images``; it ends when that dump is done.  Returns once it
        is ready."""
        proc = await self._start_ready(
            ["page-server", "--images-dir", str(images), "--ps-socket", str(pages)],
            images / "page-server.log", pages)
        make_realtime(proc.pid)
        return proc

    async def page_server_done(self, proc: trio.Process, images: Path) -> int:
        """Wait for the page server's end; the bytes of pages it received."""
        with trio.fail_after(30):
            code = await proc.wait()
        if code != 0:
            raise MoveError(f"criu page-server failed: "
                            f"{_first_error(images / 'page-server.log')}")
        return sum(f.stat().st_size for f in images.glob("pages-*.img"))

    async def lazy_pages(self, images: Path, pages: int) -> trio.Process:
        """Start ``criu lazy-pages`` for a restore from ``images`` whose memory comes on
        demand from a page server at the other end of the connected socket ``pages``
        (see omuscd.migrate.lazy); returns once it is ready.  It ends, by itself, once
        the restored job has every page."""
        return await (await self.start_lazy_pages(images, pages)).ready()

    async def start_lazy_pages(self, images: Path, pages: int) -> Starting:
        """:meth:`lazy_pages`, without waiting for it to be ready (a move's target starts
        it before the job is frozen, its first image held: see omuscd.migrate.gate)."""
        # Not real-time, unlike the other CRIU runs: once the restore is over it polls
        # without sleeping until the job has every page, and at real-time priority it
        # would starve this daemon, which relays those pages, on the same CPU.
        assert self.path is not None
        return await _start(
            self.path,
            ["lazy-pages", "--page-server", "--ps-socket", str(pages), "-D", str(images)],
            images / "lazy-pages.log", pages)

    async def _start_ready(self, args: list[str], logfile: Path, pages: int) -> trio.Process:
        """Start a CRIU server (``args``; its log ``logfile``) given the socket ``pages``;
        return it once it says it is ready (--status-fd), or raise MoveError."""
        assert self.path is not None
        return await (await _start(self.path, args, logfile, pages)).ready()

    async def prepare_restore(self, images: Path, fds: tuple[int, ...]) -> swrk.Worker:
        """Start the CRIU that will restore a job from ``images`` (see
        omuscd.migrate.swrk) before its images are all there, holding ``fds`` (the
        files the restored job inherits) at the same numbers."""
        assert self.path is not None
        return await swrk.Worker.start(self.path, (), fds, images / "restore-output.log",
                                       PRIVATE_UMASK)

    async def restore(self, images: Path, inherit: list[Inherit], pidfile: Path,
                      lazy: bool = False, worker: swrk.Worker | None = None,
                      rooted: Callable[[int], Awaitable[None]] | None = None) -> int:
        """Restore the job stopped, a child of this daemon; its init's pid (also written
        to ``pidfile``).  ``lazy``: the memory that can come later is left to a running
        :meth:`lazy_pages` for the same images.  ``worker``: from :meth:`prepare_restore`
        holding the descriptors of ``inherit`` (else started now).  ``rooted(pid)``: told
        the init's pid as soon as it exists, before CRIU restores anything of the job's
        (files, locks, memory), and before CRIU goes on (see swrk.Worker.call): whoever
        must kill the restored job, should this daemon die before it has the answer, can
        know it; a MoveError from it fails the restore, CRIU killing what it made.  CRIU
        asks before each step of the restore whether to go on: a daemon that dies in the
        middle of the restore cannot answer, and CRIU then kills what it restored (not
        left stopped for ever, holding the job's file locks)."""
        if worker is None:
            worker = await self.prepare_restore(images, tuple(i.fd for i in inherit))
        # --file-locks: it takes the job's locks again (lent by the source: see FileLock);
        # CRIU names a regular file by its path without the leading slash
        keys = [(item.path.lstrip("/"), item.fd) for item in inherit]
        told: list[int] = []

        async def notified(note: swrk.Response) -> None:
            # setup-namespaces names the init; post-restore does too (CRIU skips the
            # first for a job without namespaces of its own)
            if rooted is not None and note.notified_pid and not told and \
                    note.script in (swrk.SETUP_NS, swrk.POST_RESTORE):
                told.append(note.notified_pid)
                await rooted(note.notified_pid)

        answer = await _ask(worker, swrk.RESTORE, images, "restore", float("inf"),
                            lambda fd: swrk.restore_options(fd, "restore.log", keys, lazy,
                                                            notify=True),
                            self.keep_log, notified)
        if answer.pid is None:
            raise MoveError("criu restore said nothing of the restored job")
        if rooted is not None and not told:  # a CRIU that never named it: now, at least
            await rooted(answer.pid)
        fd = os.open(pidfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW |
                     os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, str(answer.pid).encode())
        finally:
            os.close(fd)
        return answer.pid
