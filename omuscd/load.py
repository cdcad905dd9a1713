"""Load of this node, measured over the CPUs it lends to the cluster.

``load`` is demand per lent CPU: 1.0 means every lent CPU is busy, above 1.0 means work is
waiting.  Utilisation alone saturates at 100 % whether one task or four want a CPU, so when
the lent CPUs are busy the tasks that keep them wanted are counted too (each process's
state, the CPU it last ran on and how long it has been runnable, from /proc; see
:class:`RunQueue`): four CPU-bound jobs on one lent CPU are load 4.0.  The scan costs a
millisecond or two, so it is made only when the lent CPUs are more than half busy and more
tasks are runnable than the busy CPUs account for; an idle node pays nothing for it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

import psutil

from omuscd import proctab

log = logging.getLogger(__name__)

#: Above this utilisation of the lent CPUs, runnable tasks are counted as well.
BUSY_PERCENT = 50.0
#: The share of the time the regular samples may spend counting runnable tasks: a scan
#: of /proc takes 1-2 ms on a quiet machine (counted every 1-2 s), 5 ms with 300 tasks
#: (every 5 s: at 0.5 % of the time it was counted at every sample, and an idle daemon
#: of a busy machine spent as much on it as on everything else) and up to 0.5 s when
#: hundreds of them want the CPUs (every 500 s).  The last count stands between, no
#: higher than the tasks runnable now; jobs coming or going are counted at once.  The
#: daemon answers no datagram while it scans.
SCAN_SHARE = 0.001
#: CPU seconds (per lent CPU) a sample must span to say anything: the kernel counts CPU
#: time in ticks of 10 ms, and a sample over a window of a few milliseconds read 0 % busy.
MIN_WINDOW = 0.05
#: How CRIU shows in /proc: itself, or the loader of tests/install-criu's private copy.
CRIU_COMMANDS = (b"criu", b"ld-linux-x86-64")


@dataclass
class LoadSample:
    load: float  # demand per lent CPU
    util: float  # percent busy, averaged over the lent CPUs
    runq: int  # runnable tasks on the lent CPUs (counted when they are busy)
    mem_free_mb: int


class RunQueue:
    """Counts the tasks that keep the lent CPUs wanted: threads runnable now, whose last
    CPU is a lent one, and which have been runnable (running or waiting for a CPU) for at
    least half the time since the last count, or since they were created (the kernel's
    per-task ``/proc/PID/schedstat``).  A CPU-bound job always is; a daemon, a shell or
    a client caught running at the instant of the count is not: a bare snapshot had a node
    with three jobs gossip load 5.00 and send one of them away.  Threads, not processes:
    a job whose first thread waits while three others compute is three.  Not counted:
    kernel threads (the kernel's own work, not demand that moving a job could relieve),
    this daemon, the CRIU it runs to move a job and the processes CRIU is restoring (a
    move in progress is not load: counted, it made a node that had just taken a job look
    busy enough to send one straight back), and the processes the caller names: the
    daemon's own helpers, such as each job's init, which sleeps but for a moment after a
    job starts or lands (new, and so counted on its state alone: a node with 2 jobs said
    3 just after taking one)."""

    #: share of the time since the last count a task must have been runnable
    STEADY = 0.5
    #: a task seen for less than this (seconds) is counted on its state alone
    MIN_SPAN = 0.05

    def __init__(self) -> None:
        # pid -> (its runnable nanoseconds, seconds after boot) at the last count
        self.seen: dict[int, tuple[int, float]] = {}

    def count(self, cpus: set[int], me: int | None = None,
              leave_out: Collection[int] = ()) -> int:
        me = os.getpid() if me is None else me
        table = proctab.scan(skip=me)
        criu = {p.pid for p in table.values() if p.ppid == me and p.comm in CRIU_COMMANDS}
        not_load = {p.pid for below in proctab.descendants(table, criu).values()
                    for p in below}
        not_load |= criu
        not_load.update(leave_out)
        now = time.clock_gettime(time.CLOCK_BOOTTIME)
        seen: dict[int, tuple[int, float]] = {}
        counted: list[proctab.Proc] = []
        passing: list[proctab.Proc] = []  # runnable now, but not for long enough
        for p in (t for proc in table.values() if not proc.kernel and proc.pid not in not_load
                  for t in proctab.tasks(proc)):
            if p.state != b"R" or p.cpu not in cpus:
                continue
            ns = proctab.runnable_ns(p.pid)
            if ns is None:  # the kernel keeps no figures: the state must do
                counted.append(p)
                continue
            base, since = self.seen.get(p.pid, (0, p.started))
            if since < p.started:  # the pid was reused
                base, since = 0, p.started
            if now - since < self.MIN_SPAN:
                counted.append(p)
                seen[p.pid] = (base, since)
                continue
            seen[p.pid] = (ns, now)
            steady = (ns - base) / 1e9 >= self.STEADY * (now - since)
            (counted if steady else passing).append(p)
        self.seen = seen
        if log.isEnabledFor(logging.DEBUG):
            def names(procs: list[proctab.Proc]) -> str:
                return ", ".join(f"{p.pid} {p.comm.decode(errors='replace')}" for p in procs)
            log.debug("runnable on CPUs %s: %d (%s); passing: %s", sorted(cpus), len(counted),
                      names(counted), names(passing) or "none")
        return len(counted)

    def resumed(self, pids: Iterable[int]) -> None:
        """These processes were stopped and have just been let go (a job restored stopped
        and committed, or a job resumed after a move that failed): judge them from now on.
        Their stopped time would count against them otherwise, since they were runnable
        for a small part of the time since the last count, or since CRIU created them: a
        CPU-bound job that had just landed was left out, and a node with two jobs said one
        and offered room it did not have (bench_balance: a job came to it, then one went
        back)."""
        now = time.clock_gettime(time.CLOCK_BOOTTIME)
        for pid in pids:
            try:
                tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
            except (OSError, ValueError):
                continue
            for tid in tids:
                ns = proctab.runnable_ns(tid)
                if ns is not None:
                    self.seen[tid] = (ns, now)


def runnable_at_most() -> int | None:
    """An upper bound of :meth:`RunQueue.count` for a few microseconds: the tasks
    runnable on the whole machine now, less the one reading (``/proc/loadavg``'s
    running/total), or None if unreadable."""
    try:
        with open("/proc/loadavg", "rb") as f:
            running = f.read().split()[3].split(b"/")[0]
        return max(0, int(running) - 1)
    except (OSError, ValueError, IndexError):
        return None


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

    def __init__(self, lent: list[int], helpers: Callable[[], Collection[int]] = tuple):
        self.lent = lent
        self.helpers = helpers  # pids of ours that are not demand (the jobs' inits)
        self.base = psutil.cpu_times(percpu=True)
        self.window: list[Any] | None = None  # CPU times when jobs last came or went
        self.last = LoadSample(0.0, 0.0, 0, self._mem())
        self.runq = RunQueue()
        self.counted: int | None = None  # the last count of runnable tasks
        self.next_scan = 0.0  # when the count may be made again (time.monotonic)
        self.was_runnable: int | None = None  # runnable_at_most() at the last busy sample

    @staticmethod
    def _mem() -> int:
        return int(psutil.virtual_memory().available // (1024 * 1024))

    def new_window(self) -> None:
        """Measure the next sample from now: what the CPUs did before no longer counts."""
        self.window = psutil.cpu_times(percpu=True)

    def resumed(self, pids: Iterable[int]) -> None:
        """See :meth:`RunQueue.resumed`."""
        self.runq.resumed(pids)

    def _runnable(self, lent: list[int]) -> int:
        start = time.monotonic()
        self.counted = self.runq.count(set(lent), leave_out=self.helpers())
        end = time.monotonic()
        self.next_scan = end + (end - start) / SCAN_SHARE
        return self.counted

    def _count_if_it_matters(self, util: float, lent: list[int]) -> int | None:
        """The runnable tasks, if they may raise the load above ``util``: only when the
        lent CPUs are busy, and more tasks are runnable on the whole machine than the
        busy share of the lent CPUs.  A machine kept busy by as many tasks as it has
        CPUs (another user's build, the tests of four others) said the same load, and an
        idle daemon spent 2-4 ms a second scanning /proc for it: half its CPU
        (bench_idle).  The tasks runnable must be that many at this sample and the last:
        what keeps CPUs wanted is runnable at any instant, and 100 idle daemons on one
        machine, woken together by a change they all pass on, were 70 runnable for a
        moment (a scan then cost each 0.4 s deaf to probes).  The scan takes at most
        SCAN_SHARE of the time: until it may run
        again, the last count stands (no more than the tasks runnable now).  70 daemons
        on one machine, each scanning 250 processes every second (8 ms of CPU, 400 ms
        of waiting for it between the reads, the daemon deaf meanwhile), kept 70 tasks
        runnable, which made every daemon scan again."""
        if util <= BUSY_PERCENT:
            return None
        now = runnable_at_most()
        most = now if self.was_runnable is None or now is None else min(now,
                                                                          self.was_runnable)
        self.was_runnable = now
        if most is not None and most <= util * len(lent) / 100.0:
            return None
        if self.counted is not None and most is not None and time.monotonic() < self.next_scan:
            return min(self.counted, most)
        return self._runnable(lent)

    def at_once(self) -> LoadSample:
        """A first figure the moment jobs came or went, before any CPU time has passed to
        measure: the tasks runnable on the lent CPUs now, which is what a CPU-bound job
        adds or takes away (an idle node was noticed a quarter of a second late, each time
        a job ended; a node that had just started eight jobs said 5 for a while).  A rise
        is believed as well as a fall since the count leaves out what merely happens to
        be running at the instant (see :class:`RunQueue`): a bare snapshot taken as a
        move ended caught the daemons and CRIU (a node with 2 jobs said 5).  The settled
        sample follows."""
        lent = usable(self.lent, len(self.base))
        runnable = self._runnable(lent)
        self.last = LoadSample(round(runnable / len(lent), 3), self.last.util, runnable,
                               self.last.mem_free_mb)
        return self.last

    def sample(self) -> LoadSample:
        """The load over the time since the last sample, or since jobs last came or went.
        A window too short to measure (a regular sample falling just after a change)
        leaves the figure counted at the change, and the window, as they are: measured, it
        said 0 % busy, and a node running two jobs told the others it was idle (one more
        came; another move undid it)."""
        now = psutil.cpu_times(percpu=True)
        since = self.window if self.window is not None else self.base
        lent = usable(self.lent, len(now))
        if min((sum(now[c]) - sum(since[c]) for c in lent if c < len(since)),
               default=MIN_WINDOW) < MIN_WINDOW:
            return self.last
        per_cpu = busy_percent(since, now)
        self.base, self.window = now, None
        util = sum(per_cpu[c] for c in lent) / len(lent)
        runnable = self._count_if_it_matters(util, lent)
        load, util = compute_load(per_cpu, self.lent, runnable)
        runq = runnable if runnable is not None else round(util * len(lent) / 100)
        self.last = LoadSample(load, util, runq, self._mem())
        return self.last
