"""A job's processes as one: their nice value, CPUs and signals (every process of the tree;
one that is gone, or refuses, is passed over)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

import trio

from omuscd.proctab import tree


def nice_of(pid: int) -> int | None:
    """The one nice value of a job's processes, or None if they differ."""
    try:
        nices = {os.getpriority(os.PRIO_PROCESS, p) for p in tree(pid)}
    except OSError:
        return None
    return nices.pop() if len(nices) == 1 else None


def each_in_tree(pid: int, act: Callable[[int], object]) -> None:
    """``act`` on every process of a job; one that is gone (or refuses) is passed over."""
    for p in tree(pid):
        try:
            act(p)
        except OSError:
            pass


def renice_tree(pid: int, nice: int) -> None:
    each_in_tree(pid, lambda p: os.setpriority(os.PRIO_PROCESS, p, nice))


def pin_tree(pid: int, cpus: Any) -> None:
    each_in_tree(pid, lambda p: os.sched_setaffinity(p, cpus))


def signal_tree(pid: int, sig: int) -> None:
    each_in_tree(pid, lambda p: os.kill(p, sig))


def state_of(pid: int) -> str:
    """The state letter of a process ('' if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rindex(b")") + 2:][:1].decode()
    except (OSError, ValueError):
        return ""


async def stop_all(init: int, limit: float) -> tuple[list[int], bool]:
    """SIGSTOP every process of the job whose init is ``init`` until all stand still (a
    process forked meanwhile is stopped too), or ``limit`` s have passed: their pids (none
    if the job has no process), and whether all stood still.  Each gets one SIGSTOP: a
    second one, sent to a process already stopped, would stay pending and interrupt
    CRIU's parasite in it ("Unexpected task interruption")."""
    deadline = trio.current_time() + limit
    sent: set[int] = set()
    while True:
        pids = tree(init)
        if not pids:
            return pids, False
        for pid in pids:
            if pid not in sent:
                sent.add(pid)
                try:
                    os.kill(pid, signal.SIGSTOP)
                except ProcessLookupError:
                    pass
        if all(state_of(p) in ("T", "t", "Z", "X", "") for p in pids) and tree(init) == pids:
            return pids, True
        if trio.current_time() > deadline:
            return pids, False
        await trio.sleep(0.001)
