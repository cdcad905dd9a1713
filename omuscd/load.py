"""Load of this node, measured over the CPUs it lends to the cluster.

``load`` is demand per lent CPU: 1.0 means every lent CPU is busy, above 1.0 means work is
waiting.  Utilisation alone saturates at 100 % whether one task or four want a CPU, so when
the lent CPUs are busy the runnable tasks on them are counted too (each process's state and
the CPU it last ran on, from /proc): four CPU-bound jobs on one lent CPU are load 4.0.  The
scan costs a millisecond or two, so it is made only when the lent CPUs are more than half
busy; an idle node pays nothing for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import psutil

from omuscd import proctab

#: Above this utilisation of the lent CPUs, runnable tasks are counted as well.
BUSY_PERCENT = 50.0
#: How CRIU shows in /proc: itself, or the loader of tests/install-criu's private copy.
CRIU_COMMANDS = (b"criu", b"ld-linux-x86-64")


@dataclass
class LoadSample:
    load: float  # demand per lent CPU
    util: float  # percent busy, averaged over the lent CPUs
    runq: int  # runnable tasks on the lent CPUs (counted when they are busy)
    mem_free_mb: int


def runnable_on(cpus: set[int], me: int | None = None) -> int:
    """Processes running or waiting to run whose last CPU is one of ``cpus``, but not
    kernel threads (the kernel's own work, not demand that moving a job could relieve),
    nor this daemon, nor the CRIU it runs to move a job, with the processes CRIU is
    restoring: a move in progress is not load (counted, it made a node that had just
    taken a job look busy enough to send one straight back, or too busy to take the
    next)."""
    me = os.getpid() if me is None else me
    table = proctab.scan(skip=me)
    criu = {p.pid for p in table.values() if p.ppid == me and p.comm in CRIU_COMMANDS}
    moving = {p.pid for below in proctab.descendants(table, criu).values() for p in below}
    moving |= criu
    return sum(1 for p in table.values()
               if p.state == b"R" and p.cpu in cpus and not p.kernel and p.pid not in moving)


def usable(lent: list[int], ncpus: int) -> list[int]:
    """The lent CPUs this machine has (all of them if it has none of those)."""
    return [c for c in lent if c < ncpus] or list(range(ncpus))


def compute_load(per_cpu_util: list[float], lent: list[int],
                 runnable: int | None) -> tuple[float, float]:
    """Return ``(load, util)``: the busy share of the lent CPUs, or, when counted, the
    runnable tasks per lent CPU if that is more."""
    total = max(1, len(per_cpu_util))
    lent = usable(lent, total)
    util = sum(per_cpu_util[c] for c in lent) / len(lent)
    load = util / 100.0
    if runnable is not None:
        load = max(load, runnable / len(lent))
    return round(load, 3), round(util, 1)


def busy_percent(before: list[Any], after: list[Any]) -> list[float]:
    """Per CPU, the busy share of the time between two ``psutil.cpu_times(percpu=True)``."""
    out = []
    for b, a in zip(before, after, strict=False):
        total = sum(a) - sum(b)
        idle = (a.idle - b.idle) + (getattr(a, "iowait", 0.0) - getattr(b, "iowait", 0.0))
        out.append(0.0 if total <= 0 else max(0.0, min(100.0, 100.0 * (total - idle) / total)))
    return out


class Sampler:
    """Takes load samples from the CPU times since the last one: a few /proc reads, never
    blocking.  After jobs came or went, :meth:`new_window` starts a separate window, so
    that the extra sample shows the time after the change alone (the regular one is not
    disturbed)."""

    def __init__(self, lent: list[int]):
        self.lent = lent
        self.base = psutil.cpu_times(percpu=True)
        self.window: list[Any] | None = None  # CPU times when jobs last came or went
        self.last = LoadSample(0.0, 0.0, 0, self._mem())

    @staticmethod
    def _mem() -> int:
        return int(psutil.virtual_memory().available // (1024 * 1024))

    def new_window(self) -> None:
        """Measure the next sample from now: what the CPUs did before no longer counts."""
        self.window = psutil.cpu_times(percpu=True)

    def at_once(self) -> LoadSample:
        """A first figure the moment jobs came or went, before any CPU time has passed to
        measure: the tasks runnable on the lent CPUs now, which is what a CPU-bound job
        adds or takes away (an idle node was noticed a quarter of a second late, each time
        a job ended).  Only a fall is believed at once: a snapshot taken as a move ends
        catches the daemons and CRIU still running (a node with 2 jobs said 5), and a
        rise is counted by the node that caused it anyway.  The settled sample follows."""
        lent = usable(self.lent, len(self.base))
        runnable = runnable_on(set(lent))
        load = round(runnable / len(lent), 3)
        if load < self.last.load:
            self.last = LoadSample(load, self.last.util, runnable, self.last.mem_free_mb)
        return self.last

    def sample(self) -> LoadSample:
        now = psutil.cpu_times(percpu=True)
        per_cpu = busy_percent(self.window if self.window is not None else self.base, now)
        self.base, self.window = now, None
        lent = usable(self.lent, len(per_cpu))
        busy = sum(per_cpu[c] for c in lent) / len(lent) > BUSY_PERCENT
        runnable = runnable_on(set(lent)) if busy else None
        load, util = compute_load(per_cpu, self.lent, runnable)
        runq = runnable if runnable is not None else round(util * len(lent) / 100)
        self.last = LoadSample(load, util, runq, self._mem())
        return self.last
