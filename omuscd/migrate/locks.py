"""File locks that move with their job (CRIU's ``--file-locks``), and the checks that tell,
before anything is frozen, when a lock cannot move.

CRIU carries the locks of a job (--file-locks): it writes them into the images and takes
them again in the restored processes (criu/file-lock.c: POSIX, flock and OFD locks with
F_SETLKW, flock() and F_OFD_SETLK; leases too, which are not carried here: a lease is
broken by any other open of its file).  It takes them while the source's frozen copy,
which this daemon keeps until the target confirms, still holds them: on one shared
filesystem that restore would wait for ever.  So once the dump is done, the source lends
the job's locks (takes them off the frozen processes, which run no code meanwhile) and,
should the move fail, gives them back before the job resumes.  A lock can only be lent
when nothing outside the job holds or waits for a lock on the same file: that is checked
before the freeze (lock_problem).
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import platform
import signal
import struct
import time
from collections import Counter
from dataclasses import astuple, dataclass
from pathlib import Path

import psutil
import trio

from omuscd import proctab
from omuscd.migrate import MoveError
from omuscd.proctab import fds_of, tree

log = logging.getLogger("omuscd.migrate")

#: The kinds of lock that move (as /proc/locks names them).
CARRIED_LOCKS = ("POSIX", "FLOCK", "OFDLCK")
#: How long a lock given back after a failed move may stay taken elsewhere (see
#: LockLender.relock), and how often it is tried meanwhile.
RELOCK_WAIT = 2.0
RELOCK_STEP = 0.01
#: Why a lock cannot be taken while another process holds it (fcntl: EAGAIN or EACCES).
BUSY = (os.strerror(errno.EAGAIN), os.strerror(errno.EACCES))
#: Where the lending works (it makes the frozen process run one system call, with ptrace).
LENDS_LOCKS = platform.machine() == "x86_64"


@dataclass(frozen=True)
class FileLock:
    """One line of /proc/locks (or a ``lock:`` line of /proc/PID/fdinfo/FD)."""

    kind: str  # POSIX, FLOCK, OFDLCK, LEASE, ...
    mode: str  # READ or WRITE (or UNLCK)
    pid: int  # who took it (-1 for an OFD lock)
    inode: str  # "MAJ:MIN:INO" of the locked file
    start: int
    end: str  # the last byte, or "EOF"
    blocked: bool = False  # a request waiting for the lock, not a lock

    @property
    def span(self) -> tuple[str, str, int, str]:
        return self.kind, self.mode, self.start, self.end


def parse_lock(text: str) -> FileLock | None:
    """``1: POSIX  ADVISORY  WRITE 1234 08:01:5678 0 EOF``, ``1: -> FLOCK ...``."""
    parts = text.split()
    blocked = len(parts) > 1 and parts[1] == "->"
    if blocked:
        del parts[1]
    if len(parts) < 8:
        return None
    try:
        return FileLock(parts[1], parts[3], int(parts[4]), parts[5], int(parts[6]), parts[7],
                        blocked)
    except ValueError:
        return None


def read_locks() -> list[FileLock]:
    """Every lock on this machine (read once for all the jobs of a round)."""
    try:
        with open("/proc/locks") as f:
            return [lk for ln in f if (lk := parse_lock(ln)) is not None]
    except OSError:
        return []


@dataclass(frozen=True)
class HeldLock:
    """A lock a process of a job holds, through its descriptor ``fd`` of ``path``."""

    lock: FileLock
    pid: int
    fd: int
    path: str


def held_locks(pids: list[int]) -> list[HeldLock]:
    """The locks held by the processes ``pids``, each once (the kernel lists a POSIX
    lock at each descriptor of its file description, a flock or OFD lock at each process
    sharing it)."""
    seen: set[tuple[object, ...]] = set()
    out = []
    for pid, fd in fds_of(pids, "fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                lines = [ln[5:] for ln in f if ln.startswith("lock:")]
            if not lines:
                continue
            path = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        for line in lines:
            lk = parse_lock(line)
            if lk is None or lk.blocked:
                continue
            key = (pid, lk.inode, *lk.span) if lk.kind == "POSIX" else (lk.inode, *lk.span)
            if key not in seen:
                seen.add(key)
                out.append(HeldLock(lk, pid, int(fd), path))
    return out


def _involves(pids: list[int], locks: list[FileLock]) -> bool:
    """Whether any of ``locks`` may be one of these processes' (cheap: no fdinfo read)."""
    mine = set(pids)
    # a flock's pid is its taker's, who may have left it to the job and ended
    return any(lk.pid in mine or lk.pid <= 0 or
               (lk.kind != "POSIX" and not psutil.pid_exists(lk.pid))
               for lk in locks if not lk.blocked)


def lock_problem(pids: list[int], locks: list[FileLock]) -> str | None:
    """Why the locks of the job made of ``pids`` cannot move (``locks``: /proc/locks)."""
    if not _involves(pids, locks):
        return None
    held = held_locks(pids)
    mine = set(pids)
    for h in held:
        if h.lock.kind not in CARRIED_LOCKS:
            what = "a lease" if h.lock.kind == "LEASE" else f"a {h.lock.kind} lock"
            return f"process {h.pid} holds {what} on {h.path}, which cannot move"
    if held and not LENDS_LOCKS:
        return (f"process {held[0].pid} holds a lock on {held[0].path}; file locks move "
                f"only on x86-64 machines")
    for inode in dict.fromkeys(h.lock.inode for h in held):
        path = next(h.path for h in held if h.lock.inode == inode)
        on_it = [lk for lk in locks if lk.inode == inode]
        for lk in on_it:
            if lk.blocked and lk.pid not in mine:
                return (f"process {lk.pid}, outside the job, waits for a lock on {path}, "
                        f"which the job holds")
            if not lk.blocked and lk.pid > 0 and lk.pid not in mine and \
                    psutil.pid_exists(lk.pid) and lk.kind == "POSIX":
                return f"process {lk.pid}, outside the job, also holds a lock on {path}"
        theirs = (Counter(lk.span for lk in on_it if not lk.blocked)
                  - Counter(h.lock.span for h in held if h.lock.inode == inode))
        if theirs:
            return f"a process outside the job also holds a lock on {path}"
    return None


# Making a stopped process run one system call (x86-64): what CRIU's own compel does.
_PTRACE_GETREGS, _PTRACE_SETREGS, _PTRACE_SINGLESTEP, _PTRACE_DETACH = 12, 13, 9, 17
_PTRACE_SEIZE, _PTRACE_INTERRUPT = 0x4206, 0x4207
_WALL = 0x40000000
_SYS_FCNTL, _SYS_FLOCK = 72, 73
_F_SETLK, _F_OFD_SETLK = 6, 37
_F_RDLCK, _F_WRLCK, _F_UNLCK = 0, 1, 2
_LOCK_SH, _LOCK_EX, _LOCK_NB, _LOCK_UN = 1, 2, 4, 8
_SYSCALL = b"\x0f\x05"
_REGS = ("r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax rip cs eflags "
         "rsp ss fs_base gs_base ds es fs gs").split()


class _Regs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_ulonglong) for name in _REGS]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]


def _ptrace(request: int, pid: int, addr: int = 0, data: object = None) -> None:
    if _libc.ptrace(request, pid, addr, data) == -1:
        e = ctypes.get_errno()
        raise OSError(e, f"ptrace {request} of {pid}: {os.strerror(e)}")


def _stopped(pid: int, seconds: float = 2.0) -> int:
    """Wait (briefly) for traced ``pid`` to stop; the signal it stopped with."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        got, status = os.waitpid(pid, os.WNOHANG | _WALL)
        if got == pid:
            if os.WIFSTOPPED(status):
                return os.WSTOPSIG(status)
            raise OSError(f"process {pid} ended")
        time.sleep(0.0005)
    raise OSError(f"process {pid} did not stop")


def _run_calls(pid: int, calls: list[tuple[int, int, int, bytes]]) -> list[int]:
    """Make the stopped process ``pid`` run each ``(number, arg1, arg2, memory)`` system
    call (its third argument: the address of ``memory``, copied into its stack below
    the red zone) and leave it as it was, stopped; the results (-errno on failure)."""
    _ptrace(_PTRACE_SEIZE, pid)
    caught = []
    try:
        _ptrace(_PTRACE_INTERRUPT, pid)
        _stopped(pid)
        saved = _Regs()
        _ptrace(_PTRACE_GETREGS, pid, 0, ctypes.byref(saved))
        scratch = (saved.rsp - 1024) & ~15
        mem = os.open(f"/proc/{pid}/mem", os.O_RDWR)
        try:
            code, stack = os.pread(mem, 2, saved.rip), os.pread(mem, 64, scratch)
            results = []
            try:
                os.pwrite(mem, _SYSCALL, saved.rip)
                for number, a1, a2, memory in calls:
                    os.pwrite(mem, memory, scratch)
                    regs = _Regs.from_buffer_copy(saved)
                    regs.rax, regs.orig_rax = number, 2**64 - 1  # no syscall restart
                    regs.rdi, regs.rsi, regs.rdx = a1, a2, scratch
                    _ptrace(_PTRACE_SETREGS, pid, 0, ctypes.byref(regs))
                    for _ in range(3):  # a signal may come first: held, sent again after
                        _ptrace(_PTRACE_SINGLESTEP, pid)
                        sig = _stopped(pid)
                        if sig == signal.SIGTRAP:
                            break
                        caught.append(sig)
                    _ptrace(_PTRACE_GETREGS, pid, 0, ctypes.byref(regs))
                    results.append(ctypes.c_longlong(regs.rax).value)
            finally:
                os.pwrite(mem, code, saved.rip)
                os.pwrite(mem, stack, scratch)
                _ptrace(_PTRACE_SETREGS, pid, 0, ctypes.byref(saved))
        finally:
            os.close(mem)
    finally:
        _ptrace(_PTRACE_DETACH, pid)  # back to its group stop (the job is frozen)
        for sig in caught:
            os.kill(pid, sig)
    return results


def _lock_call(h: HeldLock, take: bool) -> tuple[int, int, int, bytes]:
    """The system call that releases (or takes again, without waiting) ``h``."""
    lk = h.lock
    if lk.kind == "FLOCK":
        how = ((_LOCK_EX if lk.mode == "WRITE" else _LOCK_SH) | _LOCK_NB) if take else _LOCK_UN
        return _SYS_FLOCK, h.fd, how, b""
    kind = (_F_WRLCK if lk.mode == "WRITE" else _F_RDLCK) if take else _F_UNLCK
    length = 0 if lk.end == "EOF" else int(lk.end) - lk.start + 1
    return (_SYS_FCNTL, h.fd, _F_OFD_SETLK if lk.kind == "OFDLCK" else _F_SETLK,
            struct.pack("<hh4xqqi4x", kind, os.SEEK_SET, lk.start, length, 0))


def move_locks(held: list[HeldLock], take: bool) -> list[tuple[HeldLock, str]]:
    """Release (or take back) the locks ``held`` by frozen processes: those that could
    not be, with why."""
    failed = []
    for pid in dict.fromkeys(h.pid for h in held):
        mine = [h for h in held if h.pid == pid]
        try:
            results = _run_calls(pid, [_lock_call(h, take) for h in mine])
        except OSError as e:
            failed += [(h, str(e)) for h in mine]
            continue
        failed += [(h, os.strerror(-r)) for h, r in zip(mine, results, strict=True) if r < 0]
    return failed


class LockLender:
    """The locks taken off frozen jobs for their moves, by each job's init pid, and the
    notes that let a restarted daemon give them back (kept beside CRIU's failed logs)."""

    def __init__(self, keep_logs: Path | None):
        self.keep_logs = keep_logs
        self.lent: dict[int, list[HeldLock]] = {}

    def lend(self, init_pid: int) -> None:
        """Take the locks of the job just dumped (frozen) off it, so that its restored
        copy can take them (see FileLock); kept to give back should the move fail."""
        self._forget_gone()
        held = held_locks(tree(init_pid))
        if not held:
            return
        failed = move_locks(held, take=False)
        if failed:
            moved = [h for h in held if h not in {f for f, _ in failed}]
            self.lent[init_pid] = moved
            self.relock_now(init_pid)
            h, why = failed[0]
            raise MoveError(f"cannot lend the lock of process {h.pid} on {h.path} to the "
                            f"restored job: {why}")
        self.lent[init_pid] = held
        self._note_lent(init_pid, held)
        log.info("job with init %d: %d file lock(s) lent to its restored copy", init_pid,
                 len(held))

    def _lent_note(self, init_pid: int) -> Path:
        return (self.keep_logs or Path("/nonexistent")) / f"lent-locks-{init_pid}.json"

    def _note_lent(self, init_pid: int, held: list[HeldLock]) -> None:
        """Write down what was lent, for a daemon that restarts in the middle of the move
        and resumes the job (its init's start time tells it from a later process)."""
        if self.keep_logs is None or (init := proctab.read(init_pid)) is None:
            return
        data = json.dumps({"started": init.started, "locks": [
            [*astuple(h.lock), h.pid, h.fd, h.path] for h in held]}).encode()
        try:
            fd = os.open(self._lent_note(init_pid), os.O_WRONLY | os.O_CREAT | os.O_TRUNC |
                         os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        except OSError as e:
            log.info("criu: cannot note the locks lent by job %d: %s", init_pid, e)

    def _noted_lent(self, init_pid: int) -> list[HeldLock]:
        """The locks noted by :meth:`_note_lent` for this very process, if any."""
        try:
            fd = os.open(self._lent_note(init_pid), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with open(fd, "rb") as f:
                note = json.loads(f.read(1 << 20))
            init = proctab.read(init_pid)
            if init is None or note["started"] != init.started:
                return []
            return [HeldLock(FileLock(*v[:7]), *v[7:]) for v in note["locks"]]
        except (OSError, ValueError, KeyError, TypeError):
            return []

    def _forget_gone(self) -> None:
        """Drop what was lent by jobs that moved (the frozen copy was killed, and the
        locks with it)."""
        for gone in [p for p in self.lent if not os.path.exists(f"/proc/{p}")]:
            del self.lent[gone]
            self._lent_note(gone).unlink(missing_ok=True)

    async def relock(self, init_pid: int) -> None:
        """The move failed: give the frozen job back the locks lent for it, before it
        resumes.  A lock taken meanwhile is waited for, up to RELOCK_WAIT: the target's
        restored copy takes the job's locks, and when that target's daemon dies, its
        guard kills the copy at the moment the channel tells the source (test_locks saw
        the lock still held 20 ms later)."""
        held = self._lent_to(init_pid)
        failed = move_locks(held, take=True)
        start = trio.current_time()
        busy = [f for f in failed if f[1] in BUSY]
        given_up = [f for f in failed if f[1] not in BUSY]
        # shielded (at most RELOCK_WAIT): a daemon told to stop meanwhile resumes the
        # job with its locks, and what was lent stays on the books until then
        with trio.CancelScope(shield=True):
            while busy and trio.current_time() < start + RELOCK_WAIT:
                await trio.sleep(RELOCK_STEP)
                busy = move_locks([h for h, _ in busy], take=True)
        if failed and not busy and not given_up:
            log.info("job with init %d: its file locks were taken elsewhere (its restored "
                     "copy, being killed); given back after %.3fs", init_pid,
                     trio.current_time() - start)
        self._taken_back(init_pid, given_up + busy)

    def relock_now(self, init_pid: int) -> None:
        """:meth:`relock` without waiting for a lock taken meanwhile (a lending that
        failed halfway gives back what it took, at once)."""
        self._taken_back(init_pid, move_locks(self._lent_to(init_pid), take=True))

    def _lent_to(self, init_pid: int) -> list[HeldLock]:
        held = self.lent.get(init_pid)
        if held is None:  # this daemon restarted meanwhile (see migrate.recovery)
            held = self._noted_lent(init_pid)
        return held

    def _taken_back(self, init_pid: int, failed: list[tuple[HeldLock, str]]) -> None:
        """What was lent for the job is off the books (given back, or never will be)."""
        self.lent.pop(init_pid, None)
        self._lent_note(init_pid).unlink(missing_ok=True)
        for h, why in failed:
            log.error("job with init %d: its process %d could not take back its %s lock "
                      "on %s after a failed move (%s): it runs without it", init_pid, h.pid,
                      h.lock.kind, h.path, why)
