"""Who runs first while a job is frozen.

Moves are made when a node is busy.  While a job is stopped for its move, this daemon's
relay, CRIU and CRIU's parasite (which runs in the job's own threads) wait on each other
dozens of times, and at normal priority every one of those waits lasted until a running
job's time slice ran out: the kernel's scheduler (EEVDF) lets a waking task preempt only
at the end of the current slice, whatever its nice.  A 1 MB job with seven others beside
it stayed frozen 0.4-0.8 s, against 0.05 s on an idle node.

So for as long as a job is frozen, the daemon's main thread and the CRIU it runs are
real-time (round-robin at the lowest real-time priority, below the kernel's own threads),
as corosync runs its cluster engine.  The time is short and bounded by the move's
timeouts, and the kernel keeps 5 % of every CPU for normal tasks regardless.  Processes
and threads started meanwhile begin as normal tasks (SCHED_RESET_ON_FORK); CRIU is made
real-time explicitly, and the jobs it restores get the policy of their images back.
Without the privilege (not root) nothing changes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

#: The lowest real-time priority.
RT_PRIORITY = 1

_depth = 0  # moves under way here


def make_realtime(pid: int, cpus: set[int] | None = None) -> None:
    """CRIU, just started: real-time, and on ``cpus`` if given (a dump runs where the job
    does, so that each time CRIU waits for the parasite that CPU turns to the parasite at
    once, rather than at the end of a job's slice).  Set from here once it runs, not in
    the child before it execs: a function run in the child made Python fork this whole
    daemon instead of spawning (vfork), 3 ms more CPU per CRIU run, three runs a move."""
    # the CPUs first: once real-time it may take this CPU from the daemon at once and run
    # (a dump's first steps) before it is pinned (seen: a stand-in read both CPUs)
    if cpus:
        try:
            os.sched_setaffinity(pid, cpus)
        except OSError:
            pass
    try:
        os.sched_setscheduler(pid, os.SCHED_RR, os.sched_param(RT_PRIORITY))
    except OSError:
        pass


@contextmanager
def urgent() -> Iterator[None]:
    """The daemon's main thread is real-time while at least one move is under way."""
    global _depth
    _depth += 1
    if _depth == 1:
        _set(os.SCHED_RR | os.SCHED_RESET_ON_FORK, RT_PRIORITY)
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            _set(os.SCHED_OTHER, 0)


def _set(policy: int, priority: int) -> None:
    try:
        os.sched_setscheduler(0, policy, os.sched_param(priority))
    except OSError:
        pass


def is_realtime(pid: int = 0) -> bool:
    policy = os.sched_getscheduler(pid) & ~os.SCHED_RESET_ON_FORK
    return policy in (os.SCHED_FIFO, os.SCHED_RR)
