"""One pass over the process table, read straight from ``/proc/PID/stat``.

The load sampler counts runnable tasks on the lent CPUs and ``jobs`` adds up the CPU time
of each job's processes; both need every process's parent, and a pass through psutil
cost three times a plain read of the one file that has it all (2.6 ms against 0.9 ms for
67 processes here), paid on every ``jobs`` a script asks for while the node is busiest.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

_TICK = os.sysconf("SC_CLK_TCK")
_PF_KTHREAD = 0x00200000  # in the flags field of /proc/PID/stat
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(slots=True)
class Proc:
    pid: int  # or, for a thread (see tasks), its thread id
    ppid: int
    comm: bytes
    state: bytes  # R running or runnable, S sleeping, T stopped, ...
    cpu: int  # the CPU it last ran on
    cpu_seconds: float  # its own user and system time and that of its reaped children
    rss: int  # resident bytes
    kernel: bool  # a kernel thread (kworker, ksoftirqd...): the kernel's, not a process
    started: float  # seconds after boot (CLOCK_BOOTTIME) that it was created
    threads: int  # how many threads it has (state and cpu are those of the first)


def _read(path: str, pid: int) -> Proc | None:
    """The ``stat`` file at ``path``; None if it is gone or cannot be read."""
    try:
        with open(path, "rb") as f:
            head, tail = f.read().rsplit(b")", 1)
        v = tail.split()
        return Proc(pid, int(v[1]), head.split(b"(", 1)[-1], v[0], int(v[36]),
                    sum(int(x) for x in v[11:15]) / _TICK, int(v[21]) * _PAGE,
                    bool(int(v[6]) & _PF_KTHREAD), int(v[19]) / _TICK, int(v[17]))
    except (OSError, ValueError, IndexError):
        return None


def read(pid: int) -> Proc | None:
    """One process; None if it is gone."""
    return _read(f"/proc/{pid}/stat", pid)


def scan(skip: int | None = None) -> dict[int, Proc]:
    """Every process but ``skip``; one that ends while being read is left out."""
    table: dict[int, Proc] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid != skip and (p := read(pid)) is not None:
            table[pid] = p
    return table


def tasks(proc: Proc) -> list[Proc]:
    """Each thread of a process, with its own state and CPU: a process's own figures are
    those of its first thread, which may sleep while its other threads compute (an
    OpenMP or Java program).  A single-threaded process is itself."""
    if proc.threads <= 1:
        return [proc]
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task")]
    except (OSError, ValueError):
        return [proc]
    found = [_read(f"/proc/{proc.pid}/task/{tid}/stat", tid) for tid in tids]
    return [t for t in found if t is not None]


def runnable_ns(pid: int) -> int | None:
    """Nanoseconds the process (or thread: ``pid`` may be a thread id) has been runnable,
    running or waiting for a CPU, since it was created (``/proc/PID/schedstat``), or None
    where the kernel does not keep it."""
    try:
        with open(f"/proc/{pid}/schedstat", "rb") as f:
            run, wait, slices = f.read().split()[:3]
    except (OSError, ValueError):
        return None
    if run == wait == slices == b"0":  # scheduler statistics off: nothing is kept
        return None
    return int(run) + int(wait)


def tree(pid: int) -> list[int]:
    """``pid`` and every process below it, from the kernel's list of each task's
    children (``/proc/PID/task/TID/children``, which CRIU needs too): a few reads for a
    job, where a pass over the whole table (psutil's ``children``) read every process's
    stat file, 1.2 ms with 75 processes and paid five times per move.  Empty if ``pid``
    is gone.  Like any listing of running processes, a child forked meanwhile may be
    missed; a frozen job's list is exact."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:  # gone
            continue
        out.append(p)
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children", "rb") as f:
                    todo += [int(c) for c in f.read().split()]
            except FileNotFoundError:
                if not os.path.exists(f"/proc/{p}/task/{tid}"):
                    continue  # the thread ended
                # a kernel without CONFIG_PROC_CHILDREN: the whole table, once
                table = scan()
                return [pid, *(q.pid for q in descendants(table, {pid})[pid])] \
                    if pid in table else []
            except (OSError, ValueError):
                continue
    return out


def descendants(table: dict[int, Proc], roots: set[int]) -> dict[int, list[Proc]]:
    """For each of ``roots``, the processes below it."""
    kids: dict[int, list[Proc]] = {}
    for p in table.values():
        kids.setdefault(p.ppid, []).append(p)
    out: dict[int, list[Proc]] = {}
    for root in roots:
        below: list[Proc] = []
        todo = list(kids.get(root, []))
        while todo:
            p = todo.pop()
            below.append(p)
            todo += kids.get(p.pid, [])
        out[root] = below
    return out


def fds_of(pids: Iterable[int], table: str = "fd") -> Iterator[tuple[int, str]]:
    """Each open descriptor of the processes ``pids``: (pid, its number as listed in
    ``/proc/PID/TABLE``, ``fd`` or ``fdinfo``); a process gone meanwhile (or not ours to
    look at) is passed over."""
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/{table}")
        except OSError:
            continue
        for fd in fds:
            yield pid, fd
