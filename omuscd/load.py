"""Load of this node, measured over the CPUs it lends to the cluster.

``load`` is demand per lent CPU: 1.0 means every lent CPU is busy, above 1.0 means work is
waiting.  It is the busy share of the lent CPUs plus the runnable tasks the whole machine
cannot serve, apportioned to the lent CPUs, so that a node lending 1 of 8 CPUs does not look
idle while its owner saturates the other 7.  Raw figures (utilisation, run queue, load
average) travel too, for people and for the balancing policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil


@dataclass
class LoadSample:
    load: float  # demand per lent CPU
    util: float  # percent busy, averaged over the lent CPUs
    runq: int  # runnable tasks on the whole machine (procs_running)
    mem_free_mb: int


def procs_running(path: str = "/proc/stat") -> int:
    """Runnable tasks right now, from the kernel's own counter."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("procs_running"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def compute_load(per_cpu_util: list[float], lent: list[int], runq: int) -> tuple[float, float]:
    """Return ``(load, util)`` from per-CPU utilisation and the machine's run queue."""
    total = max(1, len(per_cpu_util))
    lent = [c for c in lent if c < total] or list(range(total))
    util = sum(per_cpu_util[c] for c in lent) / len(lent)
    waiting = max(0, runq - total)  # runnable tasks no CPU of the machine can serve
    load = util / 100.0 + waiting / total
    return round(load, 3), round(util, 1)


class Sampler:
    """Takes load samples.  psutil measures CPU time between calls, so a sample costs a
    few /proc reads and never blocks."""

    def __init__(self, lent: list[int]):
        self.lent = lent
        psutil.cpu_percent(percpu=True)  # prime the counters
        self.last = LoadSample(0.0, 0.0, 0, self._mem())

    @staticmethod
    def _mem() -> int:
        return int(psutil.virtual_memory().available // (1024 * 1024))

    def sample(self) -> LoadSample:
        per_cpu = psutil.cpu_percent(percpu=True)
        runq = max(0, procs_running() - 1)  # not counting ourselves, sampling
        load, util = compute_load(per_cpu, self.lent, runq)
        self.last = LoadSample(load, util, runq, self._mem())
        return self.last
