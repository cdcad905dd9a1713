"""A job's processes as one: their nice value, CPUs and signals (every process of the tree;
one that is gone, or refuses, is passed over)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

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
